# nixos-ami-publish: the operators' and CI's tool that turns this flake's
# disk images into AMIs. Built from the agent's source set (one workspace,
# one lock file); not part of any image.
{
  lib,
  rustPlatform,
  nixos-ami-agent,
}:
rustPlatform.buildRustPackage {
  pname = "nixos-ami-publish";
  inherit (nixos-ami-agent) src version;
  cargoLock.lockFile = ../../Cargo.lock;

  cargoBuildFlags = [
    "--package"
    "nixos-ami-publish"
  ];
  # Its unit tests (image info, names, raw and VHD disks); the tests
  # against moto run in scripts/test.
  cargoTestFlags = [
    "--package"
    "nixos-ami-publish"
    "--lib"
  ];

  meta = {
    description = "Publishes NixOS AMIs: EBS-direct snapshot, AMI, copies, sharing, SSM parameters, pruning, smoke tests";
    homepage = "https://github.com/nixos-ami-agent/nixos-ami-agent";
    license = lib.licenses.mit;
    mainProgram = "nixos-ami-publish";
    platforms = lib.platforms.linux;
  };
}
