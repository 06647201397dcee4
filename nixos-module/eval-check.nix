# checks.<system>.module-eval: evaluates the module in small NixOS
# configurations and checks what it produces (unit wiring, the timer
# override, assertions), then has the agent itself read the generated
# config file.
{
  pkgs,
  self,
}:
let
  inherit (pkgs) lib;
  eval =
    module:
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
        health = {
          required-units = [ "nginx.service" ];
          commands = [ { argv = [ "/run/current-system/sw/bin/true" ]; } ];
          http = [
            {
              url = "http://127.0.0.1/healthz";
              timeout = "5s";
            }
          ];
        };
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
  noFetch = eval {
    services.nixos-ami-agent = {
      enable = true;
      fetchAtBoot = false;
    };
  };
  disabled = eval { };
  # The AMI profile imports the module, and the README tells every target
  # configuration to import it too: twice must be harmless.
  twice = eval {
    imports = [ self.nixosModules.default ];
    services.nixos-ami-agent.enable = true;
  };

  failed = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  service = base.systemd.services.nixos-ami-agent;
  run = base.systemd.services.nixos-ami-agent-run;
  fetch = base.systemd.services.nixos-ami-agent-fetch;
  timer = watched.systemd.timers.nixos-ami-agent-run;
  cfg = base.services.nixos-ami-agent;
  # The unit text NixOS generates (overrides.conf next to the package's).
  unitText = unit: base.systemd.units.${unit}.text;

  checks = {
    "the boot run is wanted by multi-user.target" = service.wantedBy == [ "multi-user.target" ];
    "later runs are wanted by nothing (no switch starts them)" = run.wantedBy == [ ];
    "the boot's fetch is wanted by nothing (only the boot run's Wants= pulls it in)" =
      fetch.wantedBy == [ ];
    "a switch restarts none of the units" =
      !service.restartIfChanged && !run.restartIfChanged && !fetch.restartIfChanged;
    "X-RestartIfChanged=false is in [Service], where switch-to-configuration reads it" =
      lib.all
        (
          u:
          let
            parts = lib.splitString "[Service]" (unitText u);
          in
          lib.length parts == 2 && lib.hasInfix "X-RestartIfChanged=false" (lib.last parts)
        )
        [
          "nixos-ami-agent.service"
          "nixos-ami-agent-run.service"
          "nixos-ami-agent-fetch.service"
        ];
    "a switch stops none of the units" =
      !service.unitConfig.X-StopOnRemoval
      && !run.unitConfig.X-StopOnRemoval
      && !fetch.unitConfig.X-StopOnRemoval;
    "fh finds nix on the units' PATH" = lib.all (u: lib.elem base.nix.package u.path) [
      service
      run
      fetch
    ];
    "the unit files come from the package" = lib.elem cfg.package base.systemd.packages;
    "IMDS bypasses proxies" = lib.all (u: lib.hasPrefix "169.254.169.254," u.environment.NO_PROXY) [
      service
      run
      fetch
    ];
    "the boot's fetch is on by default" = fetch.enable;
    "fetchAtBoot = false disables (masks) the boot's fetch" =
      !noFetch.systemd.services.nixos-ami-agent-fetch.enable;
    "fetchAtBoot = false leaves the boot run as it was" =
      noFetch.systemd.services.nixos-ami-agent.wantedBy == [ "multi-user.target" ]
      && noFetch.systemd.services.nixos-ami-agent.enable;
    "no timer unless watch.enable" = !(base.systemd.timers ? nixos-ami-agent-run);
    "the timer resets the package's values once, then sets both" =
      timer.timerConfig.OnActiveSec == [
        ""
        "5min"
      ]
      && timer.timerConfig.OnUnitInactiveSec == "5min";
    "the timer is wanted by timers.target" = timer.wantedBy == [ "timers.target" ];
    # One empty assignment resets every OnXxxSec= of a timer: it must come
    # once, before both values.
    "the rendered timer resets once, then sets both" =
      lib.hasInfix "OnActiveSec=\nOnActiveSec=5min\nOnUnitInactiveSec=5min\n"
        watched.systemd.units."nixos-ami-agent-run.timer".text;
    "a valid configuration has no failed assertions" = failed base == [ ];
    "flake with ssm-parameter fails an assertion" = lib.any (lib.hasInfix "not both") (failed both);
    "disabled, nothing is installed" = !(disabled.environment.etc ? "nixos-ami-agent/config.toml");
    "imported twice, the module evaluates and sets its package once" =
      twice.services.nixos-ami-agent.package
      == self.packages.${pkgs.stdenv.hostPlatform.system}.nixos-ami-agent;
  };
  broken = lib.attrNames (lib.filterAttrs (_: ok: !ok) checks);

  configFile = base.environment.etc."nixos-ami-agent/config.toml".source;
  expected = builtins.toJSON {
    ssm-parameter = "/fleets/web/target";
    reboot = "never";
    # Nulls inside the lists are left out too.
    health = {
      required-units = [ "nginx.service" ];
      commands = [ { argv = [ "/run/current-system/sw/bin/true" ]; } ];
      http = [
        {
          url = "http://127.0.0.1/healthz";
          timeout = "5s";
        }
      ];
    };
    agent = {
      fh = lib.getExe' cfg.fhPackage "fh";
      determinate-nixd = "/run/current-system/sw/bin/determinate-nixd";
      retry-budget = "300s";
      report-compliance = true;
    };
  };
in
if broken != [ ] then
  throw "module-eval: failed: ${lib.concatStringsSep "; " broken}"
else
  pkgs.runCommand "nixos-ami-agent-module-eval"
    {
      nativeBuildInputs = [
        cfg.package
        pkgs.python3
      ];
      inherit expected;
      passAsFile = [ "expected" ];
    }
    ''
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
