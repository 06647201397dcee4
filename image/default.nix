# The AMI profile (nixosModules.ami): nixpkgs' Amazon image, Determinate
# Nix, fh and git as the seed repository ships them, and the agent in place
# of amazon-init. A function of the flake's inputs.
{ self
, determinate
, fh
,
}: { config
   , lib
   , pkgs
   , modulesPath
   , ...
   }:
let
  inherit (pkgs.stdenv.hostPlatform) system;
in
{
  imports = [
    # What the seed repository imports; it builds system.build.amazonImage.
    "${modulesPath}/../maintainers/scripts/ec2/amazon-image.nix"
    determinate.nixosModules.default
    self.nixosModules.default
  ];

  system.nixos.tags = lib.mkForce [ ];
  virtualisation.diskSize = lib.mkForce (4 * 1024);

  environment.systemPackages = [
    fh.packages.${system}.default
    pkgs.git
  ];

  # The agent replaces amazon-init: it runs `#!` user data (once per
  # instance) and never treats user data as a Nix configuration.
  virtualisation.amazon-init.enable = false;

  services.nixos-ami-agent = {
    enable = true;
    fhPackage = fh.packages.${system}.default;
    determinateNixdPackage = determinate.packages.${system}.default;
  };

  assertions = [
    {
      # AMI names are determinate/nixos/epoch-N/<label>-<system>.<run-id>.
      assertion = builtins.match "^[0-9][0-9]\\.[0-9][0-9]\\..*" config.system.nixos.label != null;
      message = "the NixOS label must look like YY.MM..., as AMI names carry it; it is ${config.system.nixos.label}";
    }
  ];
}
