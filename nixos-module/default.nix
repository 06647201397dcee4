# services.nixos-ami-agent: the agent as a NixOS service. The unit files
# come from the package (systemd.packages), the same text the container
# boot tests run; this module only adds what NixOS needs.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.nixos-ami-agent;
  settingsFormat = pkgs.formats.toml { };
  # TOML has no null: unset options are left out, so the agent's own
  # defaults apply; also inside lists (health.commands, health.http),
  # where lib.filterAttrsRecursive does not look.
  clean =
    v:
    if builtins.isAttrs v then
      lib.mapAttrs (_: clean) (lib.filterAttrs (_: x: x != null) v)
    else if builtins.isList v then
      map clean v
    else
      v;
  settings = clean cfg.settings;
  noProxy = lib.concatStringsSep "," (
    [
      "169.254.169.254"
      "fd00:ec2::254"
    ]
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
        assertion =
          lib.hasPrefix "/" cfg.settings.agent.fh && lib.hasPrefix "/" cfg.settings.agent.determinate-nixd;
        message = "services.nixos-ami-agent.settings.agent: `fh` and `determinate-nixd` must be absolute paths.";
      }
    ];

    environment.etc."nixos-ami-agent/config.toml".source =
      settingsFormat.generate "nixos-ami-agent-config.toml" settings;

    environment.systemPackages = [ cfg.package ];
    systemd.packages = [ cfg.package ];

    systemd.services =
      let
        # What NixOS adds to the agent's units (an overrides.conf drop-in
        # next to the package's unit files).
        common = {
          # The run switches this very system: a switch must neither restart
          # nor stop it (the unit files say so too: switch-to-configuration
          # reads X-RestartIfChanged from [Service], X-StopOnRemoval from
          # [Unit]; this keeps NixOS's own view consistent).
          restartIfChanged = false;
          unitConfig.X-StopOnRemoval = false;
          # A NixOS unit's PATH has no `nix` (nixos/lib/systemd-lib.nix),
          # and `fh apply` and `fh fetch` (which runs `nix copy`) refuse to
          # run without one (DeterminateSystems/fh src/cli/cmd/mod.rs,
          # nix_command). The agent also puts the system's sw/bin first on
          # its children's PATH.
          path = [ config.nix.package ];
          # The instance-role credentials come from IMDS; a configured proxy
          # must never see them. The operator's own exceptions are kept.
          environment = {
            NO_PROXY = noProxy;
            no_proxy = noProxy;
          };
        };
      in
      {
        # The boot run. The package's unit stays active (exited) after a
        # successful run, so the switches that follow do not start it again.
        nixos-ami-agent = common // {
          wantedBy = [ "multi-user.target" ];
        };
        # Every later run: the watch timer, pushed rollouts, operators.
        nixos-ami-agent-run = common;
        # The boot's download, while the boot goes on. No wantedBy: only
        # the boot run's Wants= pulls it in, and no target waits for it.
        # Disabled, NixOS masks the package's unit; the boot run's Wants=
        # on a masked unit is harmless, and the run downloads the closure
        # itself.
        nixos-ami-agent-fetch = common // {
          enable = lib.mkIf (!cfg.fetchAtBoot) false;
        };
      };

    systemd.timers.nixos-ami-agent-run = lib.mkIf cfg.watch.enable {
      wantedBy = [ "timers.target" ];
      # The package's timer sets defaults. One empty assignment resets all
      # of a timer's OnXxxSec= values, so it comes first and only once
      # (attributes render in alphabetical order: OnActiveSec, then
      # OnUnitInactiveSec).
      timerConfig = {
        OnActiveSec = [
          ""
          cfg.watch.interval
        ];
        OnUnitInactiveSec = cfg.watch.interval;
        RandomizedDelaySec = cfg.watch.randomizedDelay;
      };
    };
  };
}
