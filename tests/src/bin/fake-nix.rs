//! Stand-in for `nix` (and `nix-env`); see `nixos_ami_agent_tests::standin`.
fn main() {
    nixos_ami_agent_tests::standin::nix_main()
}
