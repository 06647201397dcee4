# TOML user data: the instance ends in the target configuration, applied
# once, in order, and a second run finds nothing to do.
{ pkgs
, common
,
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
    machine.wait_until_succeeds(
        "systemctl show -p ActiveState --value nixos-ami-agent.service | grep -qx inactive"
    )
    machine.succeed("systemctl show -p Result --value nixos-ami-agent.service | grep -qx success")
    machine.succeed(
        "test $(readlink -f /run/current-system) = $(readlink -f /run/booted-system/specialisation/target)"
    )
    calls = machine.succeed("cat /var/lib/standin/calls").splitlines()
    assert calls == [
        "determinate-nixd login aws",
        "fh resolve --json ${ref}",
        "fh apply nixos ${ref} switch",
    ], calls

    state = json.loads(machine.succeed("nixos-ami-agent status --json"))
    assert state["last-run"]["outcome"] == "applied", state
    assert state["last-run"]["target"]["flake"] == "${ref}", state
    machine.succeed(
        "journalctl -u nixos-ami-agent -o cat MESSAGE_ID=3f88d658b85143fcbb03f62a0a791e73 FLAKE_REF=${ref} | grep -q applied"
    )

    # Type=notify: `systemctl start` returns when the run has ended.
    machine.succeed("systemctl start nixos-ami-agent.service")
    machine.succeed(
        "journalctl -u nixos-ami-agent -o cat MESSAGE_ID=9e9b458c8dc141e9a75f3eb338906dc8 | grep -q 'nothing to do'"
    )
    assert machine.succeed("grep -c 'fh apply' /var/lib/standin/calls").strip() == "1"
  '';
}
