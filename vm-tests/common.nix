# What the VM tests share: stand-ins for determinate-nixd and fh, two
# target specialisations, the agent's settings for them, and (for the
# tests on a plain NixOS machine) the IMDS and SSM doubles on the machine's
# own 169.254.169.254 (added to lo, so nothing leaves the VM).
#
# The stand-in `fh` is as strict as the real one: like fh's `nix_command`
# (DeterminateSystems/fh src/cli/cmd/mod.rs) it refuses `apply` with "nix
# is not installed or not on the PATH" unless the caller's PATH has `nix`
# (it brings none of its own), sets the system profile with
# `nix build --profile` as fh does, and runs switch-to-configuration of
# the target (a specialisation of the booted system, in its closure),
# ignoring the switch's exit status like fh. `fh fetch REF LINK` also
# needs `nix` on the PATH, as fh's does, and roots the target's closure at
# LINK as fh does when `nix copy` has no `--out-link` (`nix-store --realise
# PATH --add-root LINK`); the closure is already in the store, so there is
# nothing to copy.
#
# Each stand-in records its arguments in /var/lib/standin/calls, and also in
# /var/lib/standin/by-unit/UNIT, UNIT being the systemd unit it runs in: the
# boot's fetch (nixos-ami-agent-fetch.service) and the boot run log in and
# resolve at the same time, in no fixed order.
{
  pkgs,
  self,
}:
let
  inherit (pkgs) lib;
  doubles = self.packages.${pkgs.stdenv.hostPlatform.system}.nixos-ami-agent-test-doubles;
in
rec {
  ref = name: "my-org/web/0.1#nixosConfigurations.${name}";

  # The test script's view of a run's outcome.
  markerRunning = name: "systemctl is-active marker-${name}.service";

  # Counts the runs the agent started (each logs "instance <id>" first).
  runsStarted = "journalctl -o cat -u nixos-ami-agent.service -u nixos-ami-agent-run.service | grep -c '^instance '";

  # The stand-ins' calls from one unit (see `standins`), for the test
  # script's `.splitlines()`.
  callsFrom = unit: "cat /var/lib/standin/by-unit/${unit}";

  # Where the boot's fetch and a run root the closure they downloaded
  # (fh fetch's LINK); the run removes both once it switched.
  bootFetchedLink = "/var/lib/nixos-ami-agent/fetched-at-boot";
  runFetchedLink = "/var/lib/nixos-ami-agent/fetched";
  noFetchedLinks = "! test -L /var/lib/nixos-ami-agent/fetched-at-boot && ! test -L /var/lib/nixos-ami-agent/fetched";

  # The boot's fetch (nixos-ami-agent-fetch.service) ended: Type=oneshot
  # with RemainAfterExit, it stays active (exited).
  fetchEnded = "systemctl show -p SubState --value nixos-ami-agent-fetch.service | grep -qx exited";

  # ... and succeeded. Its ExecStart=- makes every fetch a success of the
  # unit; the exit status says whether the fetch itself was one.
  fetchSucceeded =
    "systemctl show -p Result --value nixos-ami-agent-fetch.service | grep -qx success"
    + " && systemctl show -p ExecMainStatus --value nixos-ami-agent-fetch.service | grep -qx 0";

  # Its outcome event (MESSAGE_ID FETCHED) says it has the closure of
  # `flakeRef`: it fetched it; or it found it already fetched, by a boot
  # run that got to it first; or there was nothing to fetch, that run
  # having switched to it already. The boot run does not wait for the
  # fetch, so any of them may be the one; not "nothing to fetch: no
  # target", nor a failure.
  fetchOutcome =
    flakeRef:
    "journalctl -o cat -u nixos-ami-agent-fetch.service MESSAGE_ID=0aa4216b344d48ac89b65ded8963555c"
    + " | grep -qE '^(fetched ${flakeRef} [(]|nothing to fetch: .* already /nix/store/)|^${flakeRef} [(].*[)] is already fetched$'";

  # The stand-in programs for a machine's pkgs.
  standins =
    pkgs:
    let
      record = ''
        mkdir -p /var/lib/standin/by-unit
        printf '%s\n' "$(basename "$0") $*" >> /var/lib/standin/calls
        # The unit it runs in: the last part of its cgroup (cgroup v2).
        unit=none
        while IFS= read -r line; do
          case "$line" in
            0::*.service) unit=''${line##*/} ;;
          esac
        done < /proc/self/cgroup
        printf '%s\n' "$(basename "$0") $*" >> "/var/lib/standin/by-unit/$unit"
      '';
    in
    {
      fh = pkgs.writeShellApplication {
        name = "fh";
        # No nix here: it must come from the agent's PATH, as for the real fh.
        runtimeInputs = [ pkgs.coreutils ];
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
              if ! command -v nix >/dev/null; then
                echo "Error: failed to copy resolved store path with Nix: nix is not installed or not on the PATH" >&2
                exit 1
              fi
              path=$(target "$3")
              nix --extra-experimental-features 'nix-command flakes' build \
                --no-link --max-jobs 0 --profile /nix/var/nix/profiles/system "$path"
              /nix/var/nix/profiles/system/bin/switch-to-configuration "''${4:-switch}" || true ;;
            "fetch "*)
              [ $# -eq 3 ] || { echo "fh stand-in: usage: fh fetch FLAKE_REF TARGET_LINK" >&2; exit 2; }
              if ! command -v nix >/dev/null; then
                echo "Error: failed to copy resolved store path with Nix: nix is not installed or not on the PATH" >&2
                exit 1
              fi
              path=$(target "$2")
              # The target is in the booted system's closure: nothing to
              # copy, only the root to add (fh's fallback for a `nix copy`
              # without --out-link).
              nix-store --realise "$path" --add-root "$3" >/dev/null ;;
            *) echo "fh stand-in: unexpected arguments: $*" >&2; exit 2 ;;
          esac
        '';
      };
      determinate-nixd = pkgs.writeShellApplication {
        name = "determinate-nixd";
        runtimeInputs = [ pkgs.coreutils ];
        text = ''
          ${record}
          [ "$*" = "login aws" ] || { echo "unexpected arguments: $*" >&2; exit 2; }
          echo "Logged in to FlakeHub (stand-in)"
        '';
      };
    };

  # Two targets the stand-in can switch to: specialisations of the booted
  # system, each starting its marker service.
  targets =
    { pkgs, ... }:
    let
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
    in
    {
      specialisation = {
        target = marker "target";
        next = marker "next";
      };
    };

  # The agent's [agent] settings for the stand-ins.
  agentSettings = s: {
    fh = lib.getExe s.fh;
    determinate-nixd = lib.getExe s.determinate-nixd;
    retry-budget = "60s";
  };

  # The doubles' configuration (the IMDS double on `imds`).
  doublesConfig =
    {
      imds,
      userData,
      paramsDir ? "/var/lib/doubles/params",
    }:
    pkgs.writeText "doubles.json" (
      builtins.toJSON {
        inherit imds;
        ssm = "127.0.0.1:4566";
        instance_id = "i-0123456789abcdef0";
        region = "eu-west-1";
        role = "vm-test-role";
        user_data_file = if userData == null then null else pkgs.writeText "user-data" userData;
        params_dir = paramsDir;
      }
    );

  inherit doubles;

  machine =
    {
      userData ? null,
      parameters ? { },
      settings ? { },
      watch ? false,
    }:
    {
      pkgs,
      ...
    }:
    let
      s = standins pkgs;
      initialParameters = lib.mapAttrsToList (
        name: value:
        pkgs.writeTextDir "${lib.removePrefix "/" name}.json" (
          builtins.toJSON {
            type = "String";
            inherit value;
            version = 1;
          }
        )
      ) parameters;
    in
    {
      imports = [
        self.nixosModules.default
        targets
      ];

      # `fh` and `determinate-nixd` on PATH, as on the image: the `#!` user
      # data of the seed's README calls them by name.
      environment.systemPackages = [
        s.fh
        s.determinate-nixd
      ];

      services.nixos-ami-agent = {
        enable = true;
        settings = lib.recursiveUpdate { agent = agentSettings s; } settings;
        watch = lib.mkIf watch {
          enable = true;
          interval = "5s";
          randomizedDelay = "1s";
        };
      };
      systemd.services =
        lib.genAttrs [ "nixos-ami-agent" "nixos-ami-agent-fetch" "nixos-ami-agent-run" ] (_: {
          after = [ "imds-ssm-doubles.service" ];
          environment.AWS_ENDPOINT_URL_SSM = "http://127.0.0.1:4566";
        })
        // {
          imds-ssm-doubles = {
            description = "IMDS and SSM doubles";
            wantedBy = [ "multi-user.target" ];
            before = [
              "nixos-ami-agent.service"
              "nixos-ami-agent-fetch.service"
            ];
            path = [
              pkgs.iproute2
              pkgs.coreutils
            ];
            # 169.254.169.254 on lo: the address exists only inside this VM.
            preStart = ''
              ip addr add 169.254.169.254/32 dev lo || true
              mkdir -p /var/lib/doubles/params
            ''
            + lib.concatMapStrings (
              p: "cp -rn --no-preserve=mode ${p}/. /var/lib/doubles/params/\n"
            ) initialParameters;
            serviceConfig.ExecStart = "${lib.getExe doubles} ${
              doublesConfig {
                imds = "169.254.169.254:80";
                inherit userData;
              }
            }";
          };
        };
    };
}
