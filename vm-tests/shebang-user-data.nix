# The `#!` user data the seed repository's README documents still works:
# the agent runs it (once per instance), as amazon-init did.
{
  pkgs,
  common,
}:
let
  ref = common.ref "target";
in
pkgs.testers.runNixOSTest {
  name = "nixos-ami-agent-shebang-user-data";
  nodes.machine = common.machine {
    userData = ''
      #!/bin/sh
      determinate-nixd login aws
      fh apply nixos "${ref}"
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
    calls = machine.succeed("cat /var/lib/standin/calls").splitlines()
    assert calls == ["determinate-nixd login aws", "fh apply nixos ${ref}"], calls
    state = json.loads(machine.succeed("nixos-ami-agent status --json"))
    assert state["scripts"][0]["label"] == "user data", state
    assert state["scripts"][0]["result"] == "exit status 0", state

    # Once per instance: a later run does not run it again.
    machine.succeed("systemctl start nixos-ami-agent-run.service")
    assert machine.succeed("grep -c 'fh apply' /var/lib/standin/calls").strip() == "1"
  '';
}
