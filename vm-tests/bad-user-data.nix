# Bad user data: the unit fails with 65 (not restarted), the journal names
# the key, and nothing is switched.
{
  pkgs,
  common,
}:
pkgs.testers.runNixOSTest {
  name = "nixos-ami-agent-bad-user-data";
  nodes.machine = common.machine {
    userData = ''
      #nixos-ami-agent
      flake = "${common.ref "target"}"
      action = "swtich"
    '';
  };
  testScript = ''
    machine.wait_for_unit("multi-user.target")
    machine.wait_until_succeeds("systemctl is-failed nixos-ami-agent.service", timeout=300)
    machine.succeed("systemctl show -p ExecMainStatus --value nixos-ami-agent.service | grep -qx 65")
    machine.succeed("systemctl show -p NRestarts --value nixos-ami-agent.service | grep -qx 0")
    machine.succeed(
        "journalctl -u nixos-ami-agent -o cat MESSAGE_ID=07dbe6e6e7384bc8a3aedd0784ddc7c8 | grep -q 'key `action`'"
    )
    machine.fail("test -e /var/lib/standin/calls")
    machine.fail("${common.markerRunning "target"}")
    machine.succeed("test $(readlink -f /run/current-system) = $(readlink -f /run/booted-system)")
  '';
}
