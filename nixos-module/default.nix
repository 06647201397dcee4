# services.nixos-ami-agent: the agent as a NixOS service. The unit files
# come from the package (systemd.packages), the same text the container
# boot tests run; this module only adds what NixOS needs.
{ config
, lib
, pkgs
, ...
}:
let
  cfg = config.services.nixos-ami-agent;
  settingsFormat = pkgs.formats.toml { };
  # TOML has no null: unset options are left out, so the agent's own
  # defaults apply.
  settings = lib.filterAttrsRecursive (_: v: v != null) cfg.settings;
  noProxy = lib.concatStringsSep "," (
    [ "169.254.169.254" "fd00:ec2::254" ]
    ++ lib.optional (config.networking.proxy.noProxy != null) config.networking.proxy.noProxy
  );
in
{
  imports = [ ./options.nix ];

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.settings.flake == null || cfg.settings.ssm-parameter == null;
        message = ''
          services.nixos-ami-agent.settings: set either `flake` or
          `ssm-parameter`, not both (the agent refuses a layer with both).
        '';
      }
      {
        assertion = lib.hasPrefix "/" cfg.settings.agent.fh && lib.hasPrefix "/" cfg.settings.agent.determinate-nixd;
        message = "services.nixos-ami-agent.settings.agent: `fh` and `determinate-nixd` must be absolute paths.";
      }
    ];

    environment.etc."nixos-ami-agent/config.toml".source =
      settingsFormat.generate "nixos-ami-agent-config.toml" settings;

    environment.systemPackages = [ cfg.package ];
    systemd.packages = [ cfg.package ];

    systemd.services.nixos-ami-agent = {
      wantedBy = [ "multi-user.target" ];
      # The run switches this very system: a switch must neither restart
      # nor stop it (the unit file says so too; this keeps NixOS's own
      # view consistent).
      restartIfChanged = false;
      unitConfig.X-StopOnRemoval = false;
      # The instance-role credentials come from IMDS; a configured proxy
      # must never see them. The operator's own exceptions are kept.
      environment = {
        NO_PROXY = noProxy;
        no_proxy = noProxy;
      };
    };

    systemd.timers.nixos-ami-agent = lib.mkIf cfg.watch.enable {
      wantedBy = [ "timers.target" ];
      # The package's timer sets defaults; "" resets them before ours.
      timerConfig = {
        OnUnitInactiveSec = [ "" cfg.watch.interval ];
        RandomizedDelaySec = cfg.watch.randomizedDelay;
      };
    };
  };
}
