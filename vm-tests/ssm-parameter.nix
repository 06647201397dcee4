# The fleet's SSM parameter names the target (JSON user data, as Terraform's
# jsonencode writes it); credentials come from the instance role via IMDS.
{
  pkgs,
  common,
}:
let
  ref = common.ref "target";
in
pkgs.testers.runNixOSTest {
  name = "nixos-ami-agent-ssm-parameter";
  nodes.machine = common.machine {
    userData = builtins.toJSON {
      "nixos-ami-agent" = {
        ssm-parameter = "/fleets/web";
      };
    };
    parameters."/fleets/web" = ref;
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
    state = json.loads(machine.succeed("nixos-ami-agent status --json"))
    target = state["last-run"]["target"]
    assert target["ssm-parameter"] == "/fleets/web", target
    assert target["ssm-version"] == 1, target
    assert target["flake"] == "${ref}", target
    machine.succeed(
        "journalctl -u nixos-ami-agent -o cat MESSAGE_ID=3f88d658b85143fcbb03f62a0a791e73 SSM_PARAMETER=/fleets/web | grep -q applied"
    )

    # The boot's fetch read the same parameter and fetched (or found) the
    # target's closure, while the boot went on.
    machine.wait_until_succeeds("${common.fetchEnded}")
    machine.succeed("${common.fetchSucceeded}")
    machine.succeed("${common.fetchOutcome ref}")
    machine.succeed(
        "journalctl -u nixos-ami-agent-fetch -o cat MESSAGE_ID=0aa4216b344d48ac89b65ded8963555c SSM_PARAMETER=/fleets/web | grep -q ."
    )
    machine.succeed("journalctl -o cat -u nixos-ami-agent.service | grep -q '^run phases: '")
    assert "  phases:     " in machine.succeed("nixos-ami-agent status")
    machine.succeed("${common.noFetchedLinks}")
  '';
}
