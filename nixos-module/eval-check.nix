# checks.<system>.module-eval: evaluates the module in small NixOS
# configurations and checks what it produces (unit wiring, the timer
# override, assertions), then has the agent itself read the generated
# config file.
{ pkgs
, self
,
}:
let
  inherit (pkgs) lib;
  eval = module:
    (import "${pkgs.path}/nixos/lib/eval-config.nix" {
      inherit (pkgs.stdenv.hostPlatform) system;
      modules = [
        self.nixosModules.default
        {
          boot.isContainer = true;
          system.stateVersion = lib.trivial.release;
        }
        module
      ];
    }).config;

  base = eval {
    services.nixos-ami-agent = {
      enable = true;
      settings = {
        ssm-parameter = "/fleets/web/target";
        reboot = "never";
        agent.retry-budget = "300s";
      };
    };
  };
  watched = eval {
    services.nixos-ami-agent = {
      enable = true;
      watch = {
        enable = true;
        interval = "5min";
        randomizedDelay = "1min";
      };
    };
  };
  both = eval {
    services.nixos-ami-agent = {
      enable = true;
      settings = {
        flake = "my-org/my-flake/0.1#nixosConfigurations.web";
        ssm-parameter = "/fleets/web/target";
      };
    };
  };
  disabled = eval { };

  failed = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  service = base.systemd.services.nixos-ami-agent;
  cfg = base.services.nixos-ami-agent;

  checks = {
    "the service is wanted by multi-user.target" = service.wantedBy == [ "multi-user.target" ];
    "a switch does not restart it" = !service.restartIfChanged;
    "a switch does not stop it" = !service.unitConfig.X-StopOnRemoval;
    "the unit files come from the package" = lib.elem cfg.package base.systemd.packages;
    "IMDS bypasses proxies" = lib.hasPrefix "169.254.169.254," service.environment.NO_PROXY;
    "no timer unless watch.enable" = !(base.systemd.timers ? nixos-ami-agent);
    "the timer resets the package's interval" =
      watched.systemd.timers.nixos-ami-agent.timerConfig.OnUnitInactiveSec == [ "" "5min" ];
    "the timer is wanted by timers.target" = watched.systemd.timers.nixos-ami-agent.wantedBy == [ "timers.target" ];
    "a valid configuration has no failed assertions" = failed base == [ ];
    "flake with ssm-parameter fails an assertion" = lib.any (lib.hasInfix "not both") (failed both);
    "disabled, nothing is installed" = !(disabled.environment.etc ? "nixos-ami-agent/config.toml");
  };
  broken = lib.attrNames (lib.filterAttrs (_: ok: !ok) checks);

  configFile = base.environment.etc."nixos-ami-agent/config.toml".source;
  expected = builtins.toJSON {
    ssm-parameter = "/fleets/web/target";
    reboot = "never";
    agent = {
      fh = lib.getExe' cfg.fhPackage "fh";
      determinate-nixd = "/run/current-system/sw/bin/determinate-nixd";
      retry-budget = "300s";
    };
  };
in
if broken != [ ]
then throw "module-eval: failed: ${lib.concatStringsSep "; " broken}"
else
  pkgs.runCommand "nixos-ami-agent-module-eval"
  {
    nativeBuildInputs = [ cfg.package pkgs.python3 ];
    inherit expected;
    passAsFile = [ "expected" ];
  } ''
    # Nulls are left out, the rest is exactly what the options say.
    python3 - ${configFile} "$expectedPath" <<'PY'
    import json, sys, tomllib
    got = tomllib.load(open(sys.argv[1], "rb"))
    want = json.load(open(sys.argv[2]))
    assert got == want, f"config.toml is {got}, expected {want}"
    PY
    # The agent accepts the file: `plan` exits 78 on an invalid config.
    touch empty-user-data
    nixos-ami-agent --config ${configFile} plan --user-data empty-user-data > plan.txt
    grep -q 'SSM parameter /fleets/web/target' plan.txt
    grep -q 'reboot:     never' plan.txt
    touch $out
  ''
