# The AMI profile (nixosModules.ami): nixpkgs' Amazon image, Determinate
# Nix, fh and git as the seed repository ships them, and the agent in place
# of amazon-init. A function of the flake's inputs.
{
  self,
  determinate,
  fh,
}:
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
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

  # amazon-image.nix tags the label "amazon"; the AMI name should carry
  # the plain version (see the assertion below).
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

  assertions =
    let
      inherit (config.system.nixos) label version;
    in
    [
      {
        # AMI names are determinate/nixos/epoch-N/<label>-<system>.<run-id>,
        # and the publisher takes <label> from image-info.json's `label`.
        # nixpkgs' amazon-image.nix writes system.nixos.version there (it
        # wrote system.nixos.label in older revisions); with the tags
        # cleared above the two are the same, whichever revision builds it.
        assertion = label == version && builtins.match "[0-9][0-9]\\.[0-9][0-9]\\..*" version != null;
        message = ''
          the AMI name carries image-info.json's label, which is
          system.nixos.version (${version}); it must look like YY.MM... and
          equal system.nixos.label (${label}): do not set system.nixos.tags
          or NIXOS_LABEL_VERSION for the image.
        '';
      }
    ];
}
