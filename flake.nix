{
  description = "NixOS AMIs with Determinate Nix, and nixos-ami-agent: EC2 user data or an SSM parameter to a verified `fh apply nixos`";

  inputs = {
    nixpkgs.url = "https://flakehub.com/f/NixOS/nixpkgs/0.1";
    determinate.url = "https://flakehub.com/f/DeterminateSystems/determinate/*";
    fh.url = "https://flakehub.com/f/DeterminateSystems/fh/0.1";
  };

  outputs =
    {
      self,
      nixpkgs,
      determinate,
      fh,
    }:
    let
      inherit (nixpkgs) lib;
      linuxSystems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forLinuxSystems =
        f:
        lib.genAttrs linuxSystems (
          system:
          f {
            inherit system;
            pkgs = nixpkgs.legacyPackages.${system};
          }
        );
    in
    {
      # Bump for breaking changes to the AMIs; it is part of their names:
      # determinate/nixos/epoch-<epoch>/<label>-<system>.<run-id>.
      epoch = "1";

      overlays.default = final: _prev: {
        nixos-ami-agent = final.callPackage ./agent/package.nix { };
      };

      packages = forLinuxSystems (
        { pkgs, ... }: rec {
          nixos-ami-agent = pkgs.callPackage ./agent/package.nix { };
          nixos-ami-agent-test-doubles = pkgs.callPackage ./tests/package.nix { inherit nixos-ami-agent; };
          # For operators and CI: `nix run .#nixos-ami-publish -- upload ...`.
          nixos-ami-publish = pkgs.callPackage ./image/publish/package.nix { inherit nixos-ami-agent; };
          default = nixos-ami-agent;
        }
      );

      nixosModules = {
        # The agent's service module, with this flake's package as default.
        # The key makes importing it twice harmless (the AMI profile imports
        # it, and so may the configuration an instance switches to): the
        # module system keeps one copy per key.
        default = { pkgs, ... }: {
          key = "nixos-ami-agent#nixosModules.default";
          _file = "${self}/flake.nix#nixosModules.default";
          imports = [ ./nixos-module ];
          services.nixos-ami-agent.package =
            lib.mkDefault
              self.packages.${pkgs.stdenv.hostPlatform.system}.nixos-ami-agent;
        };
        # The whole AMI profile.
        ami = {
          key = "nixos-ami-agent#nixosModules.ami";
          _file = "${self}/flake.nix#nixosModules.ami";
          imports = [ (import ./image { inherit self determinate fh; }) ];
        };
      };

      nixosConfigurations = forLinuxSystems (
        { system, ... }:
        lib.nixosSystem {
          inherit system;
          modules = [ self.nixosModules.ami ];
        }
      );

      diskImages = forLinuxSystems (
        { system, ... }: {
          aws = self.nixosConfigurations.${system}.config.system.build.amazonImage;
        }
      );

      checks = forLinuxSystems (
        {
          system,
          pkgs,
        }:
        {
          package = self.packages.${system}.nixos-ami-agent;
          publish = self.packages.${system}.nixos-ami-publish;
          module-eval = import ./nixos-module/eval-check.nix { inherit pkgs self; };
        }
        // import ./vm-tests { inherit pkgs self; }
      );

      devShells = forLinuxSystems (
        { pkgs, ... }: {
          default = pkgs.mkShell {
            packages = with pkgs; [
              cargo
              clippy
              rustc
              rustfmt
              rust-analyzer
              deadnix
              nixfmt
            ];
          };
        }
      );

      # nixfmt (RFC 166), as nixpkgs formats; scripts/test checks with
      # nixfmt-rs, byte-identical to it.
      formatter = forLinuxSystems ({ pkgs, ... }: pkgs.nixfmt);
    };
}
