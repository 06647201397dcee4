# The IMDS and SSM doubles as one program, for the NixOS VM tests (the same
# code the black-box and container tests run against). Built from the
# agent package's source: the workspace is one lock file.
{
  lib,
  rustPlatform,
  nixos-ami-agent,
}:
rustPlatform.buildRustPackage {
  pname = "nixos-ami-agent-test-doubles";
  version = "0";

  inherit (nixos-ami-agent) src;
  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [
    "--package"
    "nixos-ami-agent-tests"
    "--bin"
    "nixos-ami-agent-doubles"
  ];
  doCheck = false;

  meta = {
    description = "IMDSv2 and SSM test doubles for nixos-ami-agent's VM tests";
    license = lib.licenses.mit;
    mainProgram = "nixos-ami-agent-doubles";
    platforms = lib.platforms.linux;
  };
}
