# The NixOS VM tests, one file per scenario, as flake checks. They need a
# host with Nix and KVM (`nix flake check`).
{
  pkgs,
  self,
}:
let
  common = import ./common.nix { inherit pkgs self; };
  call = file: import file { inherit pkgs common; };
in
{
  vm-toml-user-data = call ./toml-user-data.nix;
  vm-ssm-parameter = call ./ssm-parameter.nix;
  vm-watch-timer = call ./watch-timer.nix;
  vm-shebang-user-data = call ./shebang-user-data.nix;
  vm-bad-user-data = call ./bad-user-data.nix;
  vm-health-rollback = call ./health-rollback.nix;
  vm-ami = import ./ami.nix { inherit pkgs self common; };
}
