# With the watch timer, a changed SSM parameter is applied on a later tick.
{
  pkgs,
  common,
}:
let
  first = common.ref "target";
  second = common.ref "next";
in
pkgs.testers.runNixOSTest {
  name = "nixos-ami-agent-watch-timer";
  nodes.machine = common.machine {
    userData = ''
      #nixos-ami-agent
      ssm-parameter = "/fleets/web"
    '';
    parameters."/fleets/web" = first;
    watch = true;
  };
  testScript = ''
    import json

    machine.wait_for_unit("multi-user.target")
    machine.wait_until_succeeds("${common.markerRunning "target"}", timeout=300)
    machine.wait_for_unit("nixos-ami-agent-run.timer")

    value = json.dumps({"type": "String", "value": "${second}", "version": 2})
    machine.succeed(f"cat > /var/lib/doubles/params/fleets/web.json <<'EOF'\n{value}\nEOF")

    machine.wait_until_succeeds("${common.markerRunning "next"}", timeout=120)
    machine.fail("${common.markerRunning "target"}")
    machine.succeed(
        "test $(readlink -f /run/current-system) = $(readlink -f /run/booted-system/specialisation/next)"
    )
    machine.wait_until_succeeds(
        "nixos-ami-agent status --json | grep -q '\"ssm-version\": 2'"
    )
    applies = machine.succeed("grep 'fh apply' /var/lib/standin/calls").splitlines()
    assert applies == [
        "fh apply nixos ${first} switch",
        "fh apply nixos ${second} switch",
    ], applies
  '';
}
