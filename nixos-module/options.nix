# The options of services.nixos-ami-agent; nixos-module/default.nix
# implements them.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) literalExpression mkOption types;
  cfg = config.services.nixos-ami-agent;
  settingsFormat = pkgs.formats.toml { };
in
{
  options.services.nixos-ami-agent = {
    enable = lib.mkEnableOption ''
      nixos-ami-agent, which at boot turns this EC2 instance into the NixOS
      configuration its user data or its fleet's SSM parameter names
      (`determinate-nixd login aws`, then `fh apply nixos`), and verifies
      that the system really switched
    '';

    package = lib.mkPackageOption pkgs "nixos-ami-agent" { };

    fhPackage = lib.mkPackageOption pkgs "fh" {
      extraDescription = "The agent runs its `fh` by store path.";
    };

    determinateNixdPackage = mkOption {
      type = types.nullOr types.package;
      default = null;
      example = literalExpression "inputs.determinate.packages.\${pkgs.stdenv.hostPlatform.system}.default";
      description = ''
        The package providing `determinate-nixd` (Determinate's flake,
        which its NixOS module also installs). When null, the agent runs
        `/run/current-system/sw/bin/determinate-nixd`.
      '';
    };

    settings = mkOption {
      default = { };
      description = ''
        The image's defaults, written to
        {file}`/etc/nixos-ami-agent/config.toml`. User data overrides the
        top-level keys; only the image can set `agent`. See the README for
        every key.
      '';
      example = literalExpression ''
        {
          ssm-parameter = "/fleets/web/target";
          reboot = "never";
          agent.retry-budget = "300s";
        }
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          flake = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "my-org/my-flake/0.1#nixosConfigurations.web";
            description = ''
              FlakeHub output reference to apply,
              `{org}/{flake}/{version_req}#{attr_path}`. Not together with
              `ssm-parameter`.
            '';
          };
          ssm-parameter = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "/fleets/web/target:canary";
            description = ''
              SSM parameter (`name`, `name:label`, `name:version` or ARN)
              whose value is the target. Not together with `flake`.
            '';
          };
          action = mkOption {
            type = types.nullOr (
              types.enum [
                "switch"
                "boot"
                "test"
              ]
            );
            default = null;
            description = "How to apply the target; the agent's default is `switch`.";
          };
          reboot = mkOption {
            type = types.nullOr (
              types.enum [
                "never"
                "if-needed"
                "always"
              ]
            );
            default = null;
            description = "When to reboot after applying; the agent's default is `if-needed`.";
          };
          login = mkOption {
            type = types.nullOr types.bool;
            default = null;
            description = "Whether to run `determinate-nixd login aws` first; the agent's default is true.";
          };
          health = mkOption {
            default = { };
            description = ''
              The health gate after every `switch` or `test` that changed
              the system: systemd settled, no unit newly failed, these
              checks passed, all within `timeout`; otherwise the previous
              system is put back and the target's store path rejected.
              The agent reads this file again after each switch, so a
              target configuration sets the checks it is judged by. User
              data may set every key but `commands`.
            '';
            example = literalExpression ''
              {
                required-units = [ "nginx.service" ];
                http = [ { url = "http://127.0.0.1/healthz"; } ];
                commands = [ { argv = [ "''${pkgs.curl}/bin/curl" "-fsS" "http://127.0.0.1:9090/-/ready" ]; } ];
              }
            '';
            type = types.submodule {
              # Not freeform: a mistyped key fails evaluation, rather than
              # making the agent refuse the whole file (exit 78) at boot.
              options = {
                timeout = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  example = "5m";
                  description = "The whole gate, checks and their retries included; the agent's default is 120s.";
                };
                required-units = mkOption {
                  type = types.nullOr (types.listOf types.str);
                  default = null;
                  example = [ "nginx.service" ];
                  description = "Units that must be active after the switch.";
                };
                commands = mkOption {
                  default = null;
                  description = ''
                    Programs run after the switch (argv, no shell; the
                    program by absolute path), healthy on exit 0; retried
                    until they pass or the gate's timeout.
                  '';
                  type = types.nullOr (
                    types.listOf (
                      types.submodule {
                        options = {
                          argv = mkOption {
                            type = types.nonEmptyListOf types.str;
                            description = "The program (absolute path) and its arguments.";
                          };
                          timeout = mkOption {
                            type = types.nullOr types.str;
                            default = null;
                            description = "Per attempt; the agent's default is 10s.";
                          };
                        };
                      }
                    )
                  );
                };
                http = mkOption {
                  default = null;
                  description = ''
                    Local URLs (127.0.0.1, [::1] or localhost, plain http)
                    that must answer 2xx; retried until they do or the
                    gate's timeout.
                  '';
                  type = types.nullOr (
                    types.listOf (
                      types.submodule {
                        options = {
                          url = mkOption {
                            type = types.str;
                            description = "The URL to GET.";
                          };
                          timeout = mkOption {
                            type = types.nullOr types.str;
                            default = null;
                            description = "Per attempt; the agent's default is 10s.";
                          };
                        };
                      }
                    )
                  );
                };
                rollback = mkOption {
                  type = types.nullOr types.bool;
                  default = null;
                  description = "Whether an unhealthy system is rolled back (false: reported and kept); the agent's default is true.";
                };
              };
            };
          };
          agent = mkOption {
            default = { };
            description = "What only the image may set.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                fh = mkOption {
                  type = types.str;
                  default = lib.getExe' cfg.fhPackage "fh";
                  defaultText = literalExpression ''lib.getExe' config.services.nixos-ami-agent.fhPackage "fh"'';
                  description = "Absolute path of `fh`.";
                };
                determinate-nixd = mkOption {
                  type = types.str;
                  default =
                    if cfg.determinateNixdPackage == null then
                      "/run/current-system/sw/bin/determinate-nixd"
                    else
                      lib.getExe' cfg.determinateNixdPackage "determinate-nixd";
                  defaultText = literalExpression ''"''${config.services.nixos-ami-agent.determinateNixdPackage}/bin/determinate-nixd"'';
                  description = "Absolute path of `determinate-nixd`.";
                };
                retry-budget = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  example = "300s";
                  description = "Time each remote step (IMDS, SSM, login, resolve) may spend retrying; the agent's default is 120s.";
                };
                report-compliance = mkOption {
                  type = types.bool;
                  # On in the module, not only in the AMI: the target's
                  # own configuration (which imports this module) must
                  # keep reporting after the first switch.
                  default = true;
                  description = ''
                    Report each run's outcome to SSM Compliance (type
                    `Custom:NixOSAmiAgent`), for `nixos-ami-agent fleet
                    status` and the Systems Manager console. The instance
                    role needs `ssm:PutComplianceItems`; a report that fails
                    is logged and never fails the run.
                  '';
                };
              };
            };
          };
        };
      };
    };

    fetchAtBoot = mkOption {
      type = types.bool;
      default = true;
      example = false;
      description = ''
        Whether to download the target's closure while the boot goes on:
        `nixos-ami-agent-fetch.service`, pulled in by the boot run, starts
        as soon as the network is online, logs in, resolves the target and
        runs `fh fetch`, which keeps the closure from the garbage collector
        until a run switches to it. The boot run (after
        `multi-user.target`) then finds the closure there and only
        switches. A fetch that fails is recorded (`nixos-ami-agent
        status`, the journal) but fails nothing: the run downloads what is
        missing. When false, the unit is masked and the boot run downloads
        the closure itself, after `multi-user.target`, as before.
      '';
    };

    watch = {
      enable = lib.mkEnableOption ''
        a timer (`nixos-ami-agent-run.timer`) that re-runs the agent through
        `nixos-ami-agent-run.service`, so the instance follows changes of
        its fleet's SSM parameter
      '';
      interval = mkOption {
        type = types.str;
        default = "15min";
        example = "5min";
        description = ''
          Time from boot to the first re-run, and from the end of one run to
          the next (systemd's `OnActiveSec` and `OnUnitInactiveSec`). At the
          default, 10 000 instances stay well under SSM's 40 requests a
          second (BENCHMARKS.md).
        '';
      };
      randomizedDelay = mkOption {
        type = types.str;
        default = "5min";
        description = "Random extra delay, so a fleet booted together does not call SSM in lockstep (`RandomizedDelaySec`).";
      };
    };
  };
}
