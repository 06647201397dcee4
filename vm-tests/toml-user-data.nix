# TOML user data: the instance ends in the target configuration, applied
# once, in order, its closure fetched while the boot went on
# (nixos-ami-agent-fetch.service), and a second run finds nothing to do.
{
  pkgs,
  common,
}:
let
  ref = common.ref "target";
in
pkgs.testers.runNixOSTest {
  name = "nixos-ami-agent-toml-user-data";
  nodes.machine = common.machine {
    userData = ''
      #nixos-ami-agent
      flake = "${ref}"
    '';
  };
  testScript = ''
    import json

    machine.wait_for_unit("multi-user.target")
    machine.wait_until_succeeds("${common.markerRunning "target"}", timeout=300)
    # The boot run stays active (exited) after it succeeded.
    machine.wait_until_succeeds(
        "systemctl show -p SubState --value nixos-ami-agent.service | grep -qx exited"
    )
    machine.succeed("systemctl show -p Result --value nixos-ami-agent.service | grep -qx success")
    machine.succeed(
        "test $(readlink -f /run/current-system) = $(readlink -f /run/booted-system/specialisation/target)"
    )

    # The boot's fetch ran beside the boot run, and succeeded.
    machine.wait_until_succeeds("${common.fetchEnded}")
    machine.succeed("${common.fetchSucceeded}")
    machine.succeed("${common.fetchOutcome ref}")
    machine.succeed("journalctl -o cat -u nixos-ami-agent-fetch.service | grep -q '^fetch phases: '")

    login = "determinate-nixd login aws"
    resolve = "fh resolve --json ${ref}"
    boot_fetch = "fh fetch ${ref} ${common.bootFetchedLink}"
    run_fetch = "fh fetch ${ref} ${common.runFetchedLink}"
    apply = "fh apply nixos ${ref} switch"
    # The boot run does not wait for the fetch: it fetches itself only what
    # is not fetched yet, and normally only switches. Either way the
    # closure was fetched before the switch, by one of them.
    run_calls = machine.succeed("${common.callsFrom "nixos-ami-agent.service"}").splitlines()
    assert run_calls in ([login, resolve, apply], [login, resolve, run_fetch, apply]), run_calls
    fetch_calls = machine.succeed(
        "${common.callsFrom "nixos-ami-agent-fetch.service"}"
    ).splitlines()
    assert fetch_calls in ([login, resolve, boot_fetch], [login, resolve]), fetch_calls
    assert boot_fetch in fetch_calls or run_fetch in run_calls, (run_calls, fetch_calls)
    calls = machine.succeed("cat /var/lib/standin/calls").splitlines()
    assert len(calls) == len(run_calls) + len(fetch_calls), calls
    # A fetch of the run's own that failed would only be a warning.
    machine.fail("journalctl -o cat -u nixos-ami-agent.service | grep -q '^fetching failed'")

    state = json.loads(machine.succeed("nixos-ami-agent status --json"))
    assert state["last-run"]["outcome"] == "applied", state
    assert state["last-run"]["target"]["flake"] == "${ref}", state
    phases = [p["phase"] for p in state["last-run"]["phases"]]
    assert "fetch" in phases and "switch" in phases, state

    # Where the time went: in the journal, and in `status` (the last run's
    # phases, and the boot's fetch).
    machine.succeed("journalctl -o cat -u nixos-ami-agent.service | grep -q '^run phases: '")
    status = machine.succeed("nixos-ami-agent status")
    assert "  phases:     " in status, status
    assert "last fetch:" in status, status

    # Switched: the system profile roots the closure now, and the fetch's
    # GC root is gone.
    machine.succeed("${common.noFetchedLinks}")
    machine.succeed(
        "journalctl -u nixos-ami-agent -o cat MESSAGE_ID=3f88d658b85143fcbb03f62a0a791e73 FLAKE_REF=${ref} | grep -q applied"
    )

    # fh found `nix` (the stand-in refuses to apply without it): the agent
    # gave it a PATH with the system's programs.
    assert machine.succeed("${common.runsStarted}").strip() == "1"

    # A switch started by someone else (what nixos-rebuild does) starts all
    # active targets again; it must not start a second run.
    machine.succeed("/run/current-system/bin/switch-to-configuration test")
    machine.sleep(3)
    assert machine.succeed("${common.runsStarted}").strip() == "1", "a switch started a run"
    machine.succeed("systemctl show -p SubState --value nixos-ami-agent.service | grep -qx exited")

    # A run on purpose goes through nixos-ami-agent-run.service; Type=notify:
    # `systemctl start` returns when the run has ended.
    machine.succeed("systemctl start nixos-ami-agent-run.service")
    machine.succeed(
        "journalctl -u nixos-ami-agent-run -o cat MESSAGE_ID=9e9b458c8dc141e9a75f3eb338906dc8 | grep -q 'nothing to do'"
    )
    assert machine.succeed("${common.runsStarted}").strip() == "2"
    assert machine.succeed("grep -c 'fh apply' /var/lib/standin/calls").strip() == "1"
  '';
}
