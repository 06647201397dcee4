# The health gate: the fleet's SSM parameter names a specialisation whose
# marker service fails. The boot run switches to it, finds the unit newly
# failed, puts the booted system back and rejects the store path; no later
# run applies it again. A healthy target named afterwards is applied and
# judged healthy.
{
  pkgs,
  common,
}:
let
  brokenRef = common.ref "broken";
  healthyRef = common.ref "target";
in
pkgs.testers.runNixOSTest {
  name = "nixos-ami-agent-health-rollback";
  nodes.machine =
    { pkgs, ... }:
    {
      imports = [
        (common.machine {
          userData = ''
            #nixos-ami-agent
            ssm-parameter = "/fleets/web"
          '';
          parameters."/fleets/web" = brokenRef;
        })
      ];
      # A third target next to common.nix's `target` and `next` (the
      # stand-in fh resolves any name under /run/booted-system/specialisation).
      # A specialisation inherits the whole machine, agent included, and
      # adds a marker that fails. No settings.health: the agent's defaults
      # alone must catch a unit that fails after the switch.
      specialisation.broken.configuration.systemd.services.marker-broken = {
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          Type = "oneshot";
          ExecStart = "${pkgs.coreutils}/bin/false";
        };
      };
    };
  testScript = ''
    import json


    def state():
        return json.loads(machine.succeed("cat /var/lib/nixos-ami-agent/state.json"))


    def applies():
        return int(machine.succeed("grep -c 'fh apply' /var/lib/standin/calls").strip())


    machine.wait_for_unit("multi-user.target")
    booted = machine.succeed("readlink -f /run/booted-system").strip()
    broken = machine.succeed("readlink -f /run/booted-system/specialisation/broken").strip()
    healthy = machine.succeed("readlink -f /run/booted-system/specialisation/target").strip()

    # The boot run applies `broken`, rolls back and exits 1; the unit
    # restarts it (Restart=on-failure), and that run exits 65 without
    # applying, the store path being rejected (RestartPreventExitStatus=65
    # ends it there). Only that final state is failed: between the two the
    # unit is in auto-restart.
    machine.wait_until_succeeds(
        "systemctl is-failed nixos-ami-agent.service"
        " && systemctl show -p ExecMainStatus --value nixos-ami-agent.service | grep -qx 65",
        timeout=300,
    )
    machine.succeed("systemctl show -p Result --value nixos-ami-agent.service | grep -qx exit-code")
    machine.succeed("systemctl show -p NRestarts --value nixos-ami-agent.service | grep -qx 1")
    machine.succeed(
        "journalctl -u nixos-ami-agent -o cat"
        f" | grep -F 'failed (exit 1): health: unhealthy after switching to {broken} '"
        f" | grep -qF 'rolled back to {booted}'"
    )
    machine.succeed(
        "journalctl -u nixos-ami-agent -o cat MESSAGE_ID=71e23dba107e468494c831ed1fa05bbc"
        f" | grep -qF 'rolled back from {broken} to {booted}'"
    )
    machine.succeed(
        "journalctl -u nixos-ami-agent -o cat MESSAGE_ID=07dbe6e6e7384bc8a3aedd0784ddc7c8"
        f" | grep -qF 'its store path {broken} was rolled back at'"
    )

    # The booted system runs again, and is the boot default again.
    machine.succeed(f"test $(readlink -f /run/current-system) = {booted}")
    machine.succeed(f"test $(readlink -f /nix/var/nix/profiles/system) = {booted}")
    # marker-broken is gone, not merely stopped: switch-to-configuration
    # resets failed units before it reloads systemd (nixpkgs
    # switch-to-configuration-ng, "Forget about previously failed
    # services"), and the unit has no file in the booted system.
    machine.fail("${common.markerRunning "broken"}")
    machine.fail("systemctl is-failed marker-broken.service")
    machine.fail("systemctl cat marker-broken.service")

    s = state()
    assert [r["store-path"] for r in s["rejected"]] == [broken], s
    assert s["rejected"][0]["flake"] == "${brokenRef}", s
    assert "marker-broken.service" in s["rejected"][0]["reason"], s
    # The restart's record replaced last-run; the rolled-back run's health
    # record is kept with the apply it judged (last-applied).
    assert s["last-run"]["outcome"] == "failed", s
    assert "was rolled back at" in s["last-run"]["message"], s
    applied = s["last-applied"]
    assert applied["store-path"] == broken, s
    assert applied["health"]["state"] == "rolled-back", s
    assert applied["health"]["previous"] == booted, s
    assert any("marker-broken.service" in p for p in applied["health"]["problems"]), s
    # The previous system was judged again after the rollback.
    assert applied["health"]["rollback"].startswith(f"rolled back to {booted}; it is healthy"), s

    status = machine.succeed("nixos-ami-agent status")
    assert f"rejected:     {broken} (${brokenRef}) at " in status, status
    assert "  health:     unhealthy, rolled back" in status, status
    assert applies() == 1

    # A later run refuses the rejected store path: 65, nothing applied.
    machine.fail("systemctl start nixos-ami-agent-run.service")
    machine.succeed("systemctl show -p ExecMainStatus --value nixos-ami-agent-run.service | grep -qx 65")
    machine.succeed(
        "journalctl -u nixos-ami-agent-run -o cat"
        f" | grep -qF 'not applying ${brokenRef}: its store path {broken} was rolled back at'"
    )
    assert applies() == 1
    machine.succeed(f"test $(readlink -f /run/current-system) = {booted}")

    # The fleet owner's fix: the parameter names a healthy target.
    value = json.dumps({"type": "String", "value": "${healthyRef}", "version": 2})
    machine.succeed(f"cat > /var/lib/doubles/params/fleets/web.json <<'EOF'\n{value}\nEOF")
    # Run through the failed boot unit itself. A switch made by
    # nixos-ami-agent-run.service would start it anyway
    # (switch-to-configuration resets failed units and starts every active
    # target, and multi-user.target wants it), and its start job would wait
    # for the run's lock while that run's gate waits for systemd to settle.
    machine.succeed("systemctl start nixos-ami-agent.service")
    machine.succeed("systemctl show -p Result --value nixos-ami-agent.service | grep -qx success")
    machine.succeed("${common.markerRunning "target"}")
    machine.succeed(f"test $(readlink -f /run/current-system) = {healthy}")
    s = state()
    assert s["last-run"]["outcome"] == "applied", s
    assert s["last-run"]["store-path"] == healthy, s
    assert s["last-run"]["target"]["flake"] == "${healthyRef}", s
    assert s["last-run"]["health"]["state"] == "healthy", s
    # The rejection stays until forgotten.
    assert [r["store-path"] for r in s["rejected"]] == [broken], s
    assert applies() == 2
    assert "  health:     healthy" in machine.succeed("nixos-ami-agent status")

    machine.succeed(f"nixos-ami-agent forget-rejected {broken}")
    assert state().get("rejected", []) == [], state()
    machine.fail("nixos-ami-agent status | grep -q '^rejected:'")
  '';
}
