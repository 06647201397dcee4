# What every VM test's machine shares: the agent's module, the IMDS and SSM
# doubles on the machine's own 169.254.169.254 (added to lo, so nothing
# leaves the VM), and stand-ins for determinate-nixd and fh. The stand-in
# `fh apply nixos` really switches: it sets the system profile and runs
# switch-to-configuration of the target, a specialisation of the booted
# system (`#nixosConfigurations.target` → specialisation "target"), where
# a marker service runs. Like the real fh, it ignores the switch's exit
# status.
{ pkgs
, self
,
}:
let
  inherit (pkgs) lib;
  doubles = self.packages.${pkgs.stdenv.hostPlatform.system}.nixos-ami-agent-test-doubles;
in
rec {
  ref = name: "my-org/web/0.1#nixosConfigurations.${name}";

  # The test script's view of a run's outcome.
  markerRunning = name: "systemctl is-active marker-${name}.service";

  machine =
    { userData ? null
    , parameters ? { }
    , settings ? { }
    , watch ? false
    ,
    }: { config
       , pkgs
       , ...
       }:
    let
      record = ''
        mkdir -p /var/lib/standin
        printf '%s\n' "$(basename "$0") $*" >> /var/lib/standin/calls
      '';
      fh = pkgs.writeShellApplication {
        name = "fh";
        runtimeInputs = [ pkgs.coreutils config.nix.package ];
        text = ''
          ${record}
          target() {
            path=$(readlink -f "/run/booted-system/specialisation/''${1##*#nixosConfigurations.}") \
              || { echo "error: no output $1" >&2; exit 1; }
            echo "$path"
          }
          case "$1 $2" in
            "resolve --json")
              path=$(target "$3")
              printf '{"attribute_path":"%s","store_path":"%s"}\n' "''${3#*#}" "$path" ;;
            "apply nixos")
              path=$(target "$3")
              nix-env -p /nix/var/nix/profiles/system --set "$path"
              "$path/bin/switch-to-configuration" "''${4:-switch}" || true ;;
            *) echo "fh stand-in: unexpected arguments: $*" >&2; exit 2 ;;
          esac
        '';
      };
      determinate-nixd = pkgs.writeShellApplication {
        name = "determinate-nixd";
        text = ''
          ${record}
          [ "$*" = "login aws" ] || { echo "unexpected arguments: $*" >&2; exit 2; }
          echo "Logged in to FlakeHub (stand-in)"
        '';
      };
      marker = name: {
        configuration.systemd.services."marker-${name}" = {
          wantedBy = [ "multi-user.target" ];
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = "${pkgs.coreutils}/bin/true";
          };
        };
      };
      doublesConfig = pkgs.writeText "doubles.json" (builtins.toJSON {
        imds = "169.254.169.254:80";
        ssm = "127.0.0.1:4566";
        instance_id = "i-0123456789abcdef0";
        region = "eu-west-1";
        role = "vm-test-role";
        user_data_file =
          if userData == null
          then null
          else pkgs.writeText "user-data" userData;
        params_dir = "/var/lib/doubles/params";
      });
      initialParameters = lib.mapAttrsToList
        (name: value:
          pkgs.writeTextDir "${lib.removePrefix "/" name}.json" (builtins.toJSON {
            type = "String";
            inherit value;
            version = 1;
          }))
        parameters;
    in
    {
      imports = [ self.nixosModules.default ];

      # `fh` and `determinate-nixd` on PATH, as on the image: the `#!` user
      # data of the seed's README calls them by name.
      environment.systemPackages = [ fh determinate-nixd ];

      specialisation = {
        target = marker "target";
        next = marker "next";
      };

      systemd.services.imds-ssm-doubles = {
        description = "IMDS and SSM doubles";
        wantedBy = [ "multi-user.target" ];
        before = [ "nixos-ami-agent.service" ];
        path = [ pkgs.iproute2 pkgs.coreutils ];
        # 169.254.169.254 on lo: the address exists only inside this VM.
        preStart =
          ''
            ip addr add 169.254.169.254/32 dev lo || true
            mkdir -p /var/lib/doubles/params
          ''
          + lib.concatMapStrings (p: "cp -rn --no-preserve=mode ${p}/. /var/lib/doubles/params/\n") initialParameters;
        serviceConfig.ExecStart = "${lib.getExe doubles} ${doublesConfig}";
      };

      services.nixos-ami-agent = {
        enable = true;
        settings =
          lib.recursiveUpdate
            {
              agent = {
                fh = lib.getExe fh;
                determinate-nixd = lib.getExe determinate-nixd;
                retry-budget = "60s";
              };
            }
            settings;
        watch = lib.mkIf watch {
          enable = true;
          interval = "5s";
          randomizedDelay = "1s";
        };
      };
      systemd.services.nixos-ami-agent = {
        after = [ "imds-ssm-doubles.service" ];
        environment.AWS_ENDPOINT_URL_SSM = "http://127.0.0.1:4566";
      };
    };
}
