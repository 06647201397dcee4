# The agent, built from the workspace's Cargo.lock, with its systemd units.
{
  lib,
  stdenv,
  rustPlatform,
  rustc,
  installShellFiles,
}:
let
  cargoToml = lib.importTOML ./Cargo.toml;
  # The workspace's rust-version (the AWS SDK crates need it).
  msrv = (lib.importTOML ../Cargo.toml).workspace.package.rust-version;
in
# A clear message instead of a compile error deep in the AWS SDK: NixOS
# 26.05 ships rustc 1.95, 25.11 an older one (README: Prerequisites).
assert lib.assertMsg (lib.versionAtLeast rustc.version msrv)
  "nixos-ami-agent needs rustc >= ${msrv} (nixpkgs 26.05 or later); this nixpkgs has ${rustc.version}";
rustPlatform.buildRustPackage {
  pname = "nixos-ami-agent";
  inherit (cargoToml.package) version;

  # The workspace (the lock file covers all members), nothing else: a
  # change to the README or the Nix files does not rebuild the agent.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../core/Cargo.toml
      ../core/src
      ../agent/Cargo.toml
      ../agent/src
      ../agent/systemd
      ../tests/Cargo.toml
      ../tests/src
      ../image/publish/Cargo.toml
      ../image/publish/src
    ];
  };
  cargoLock.lockFile = ../Cargo.lock;
  nativeBuildInputs = [ installShellFiles ];

  cargoBuildFlags = [
    "--package"
    "nixos-ami-agent"
  ];
  # The unit tests. The black-box and boot tests need the doubles and
  # root; scripts/test and the NixOS VM tests run those.
  cargoTestFlags = [
    "--package"
    "nixos-ami-agent-core"
    "--package"
    "nixos-ami-agent"
    "--lib"
  ];

  postInstall = ''
    install -Dm644 agent/systemd/nixos-ami-agent.service agent/systemd/nixos-ami-agent-fetch.service \
      agent/systemd/nixos-ami-agent-run.service agent/systemd/nixos-ami-agent-run.timer \
      -t $out/lib/systemd/system
    install -Dm644 agent/systemd/80-nixos-ami-agent.preset -t $out/lib/systemd/system-preset
    substituteInPlace $out/lib/systemd/system/nixos-ami-agent.service \
      $out/lib/systemd/system/nixos-ami-agent-fetch.service \
      $out/lib/systemd/system/nixos-ami-agent-run.service \
      --replace-fail '@bindir@' "$out/bin"
  ''
  # Man pages and completions come from the clap definitions.
  + lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    $out/bin/nixos-ami-agent generate-assets --out assets
    installManPage assets/man/*.1
    installShellCompletion \
      --bash assets/completions/nixos-ami-agent.bash \
      --zsh assets/completions/_nixos-ami-agent \
      --fish assets/completions/nixos-ami-agent.fish
  '';

  meta = {
    description = "First-boot agent for NixOS AMIs: EC2 user data or an SSM parameter to a verified `fh apply nixos`";
    homepage = "https://github.com/nixos-ami-agent/nixos-ami-agent";
    license = lib.licenses.mit;
    mainProgram = "nixos-ami-agent";
    platforms = lib.platforms.linux;
  };
}
