# The AMI profile itself (nixosModules.ami: nixpkgs' amazon-image.nix,
# Determinate's module, fh, git and the agent, amazon-init off), built as
# nixpkgs' nixos/tests/ec2.nix and ec2-image.nix build it: the image from
# system.build.amazonImage (qcow2 here), booted from a copy-on-write
# overlay, with IMDS reached at 169.254.169.254 through QEMU's user
# networking (guestfwd). Behind it, on the test driver's loopback, the
# project's IMDSv2 double serves the user data.
#
# Only the programs that need FlakeHub are stand-ins (fh, determinate-nixd,
# by path in the agent's settings); the rest is the image as published.
{
  pkgs,
  self,
  common,
}:
let
  inherit (pkgs) lib;
  ref = common.ref "target";
  userData = ''
    #nixos-ami-agent
    flake = "${ref}"
  '';
  imdsPort = 18080;

  imageConfig =
    (import "${pkgs.path}/nixos/lib/eval-config.nix" {
      system = null;
      modules = [
        self.nixosModules.ami
        # The README tells target configurations to import the module too;
        # with the profile already importing it, that must be harmless.
        self.nixosModules.default
        "${pkgs.path}/nixos/modules/testing/test-instrumentation.nix"
        "${pkgs.path}/nixos/modules/profiles/qemu-guest.nix"
        common.targets
        {
          # The test's own nixpkgs (as nixpkgs' ec2-image.nix does).
          nixpkgs.pkgs = pkgs;
          amazonImage.format = "qcow2";
          # The serial console belongs to the test driver's backdoor.
          systemd.services."serial-getty@ttyS0".enable = lib.mkForce false;
          services.nixos-ami-agent.settings.agent = common.agentSettings (common.standins pkgs);
        }
      ];
    }).config;

  image = "${imageConfig.system.build.amazonImage}/${imageConfig.image.fileName}";
  efi = imageConfig.ec2.efi;
in
pkgs.testers.runNixOSTest (
  { hostPkgs, ... }: {
    name = "nixos-ami-agent-ami";
    nodes = { };
    testScript = ''
      import json
      import os
      import shutil
      import subprocess
      import tempfile
      import time

      state_dir = tempfile.mkdtemp()

      # The IMDS double on the driver's loopback; QEMU forwards the guest's
      # 169.254.169.254:80 to it, one socat per connection.
      doubles = subprocess.Popen(
          ["${lib.getExe common.doubles}", "${
            common.doublesConfig {
              imds = "127.0.0.1:${toString imdsPort}";
              inherit userData;
              paramsDir = "/tmp/nixos-ami-agent-params";
            }
          }"]
      )
      for _ in range(100):
          if subprocess.run(
              ["${hostPkgs.curl}/bin/curl", "-sf", "-X", "PUT",
               "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
               "http://127.0.0.1:${toString imdsPort}/latest/api/token"],
              stdout=subprocess.DEVNULL,
          ).returncode == 0:
              break
          time.sleep(0.1)

      disk = os.path.join(state_dir, "machine.qcow2")
      subprocess.check_call(
          ["${hostPkgs.qemu_kvm}/bin/qemu-img", "create", "-f", "qcow2", "-F", "qcow2",
           "-o", "backing_file=${image}", disk]
      )
      subprocess.check_call(["${hostPkgs.qemu_kvm}/bin/qemu-img", "resize", disk, "10G"])

      firmware = ""
      if ${if efi then "True" else "False"}:
          efi_vars = os.path.join(state_dir, "efivars.fd")
          shutil.copy2("${hostPkgs.OVMF.variables}", efi_vars)
          os.chmod(efi_vars, 0o644)
          firmware = (
              " -drive if=pflash,format=raw,unit=0,readonly=on,file=${hostPkgs.OVMF.firmware}"
              + f" -drive if=pflash,format=raw,unit=1,file={efi_vars}"
          )

      start_command = (
          "qemu-kvm -m 1536"
          + "${lib.optionalString hostPkgs.stdenv.hostPlatform.isAarch64 " -machine virt -cpu host"}"
          + firmware
          + f" -drive file={disk},if=virtio,werror=report"
          + " -device virtio-net-pci,netdev=ec2"
          # 169.0.0.0/8 keeps dhcpcd away from link-local (nixpkgs' ec2.nix).
          + " -netdev 'user,id=ec2,net=169.0.0.0/8,guestfwd=tcp:169.254.169.254:80-cmd:"
          + "${hostPkgs.socat}/bin/socat STDIO TCP:127.0.0.1:${toString imdsPort}'"
          + " $QEMU_OPTS"
      )
      machine = create_machine(start_command)

      try:
          machine.start()
          machine.wait_for_unit("multi-user.target")

          with subtest("the image is the AMI profile"):
              machine.fail("systemctl cat amazon-init.service")
              machine.succeed("systemctl cat determinate-nixd.socket")
              machine.succeed(
                    "for c in fh git nix determinate-nixd nixos-ami-agent; do command -v \"$c\"; done"
                )
              machine.succeed("systemctl is-enabled nixos-ami-agent.service")
              # The boot's fetch: shipped, not masked (fetchAtBoot), wanted by
              # the boot run alone.
              machine.succeed(
                  "systemctl show -p LoadState --value nixos-ami-agent-fetch.service | grep -qx loaded"
              )
              assert machine.succeed(
                  "systemctl show -p WantedBy --value nixos-ami-agent-fetch.service"
              ).strip() == "nixos-ami-agent.service"

          with subtest("the boot run applies the user data's target"):
              machine.wait_until_succeeds("${common.markerRunning "target"}", timeout=600)
              machine.wait_until_succeeds(
                  "systemctl show -p SubState --value nixos-ami-agent.service | grep -qx exited"
              )
              machine.succeed(
                  "test $(readlink -f /run/current-system) = $(readlink -f /run/booted-system/specialisation/target)"
              )
              login = "determinate-nixd login aws"
              resolve = "fh resolve --json ${ref}"
              boot_fetch = "fh fetch ${ref} ${common.bootFetchedLink}"
              run_fetch = "fh fetch ${ref} ${common.runFetchedLink}"
              apply = "fh apply nixos ${ref} switch"
              # The boot run fetches only what the boot's fetch has not
              # fetched yet (it does not wait for it).
              run_calls = machine.succeed(
                  "${common.callsFrom "nixos-ami-agent.service"}"
              ).splitlines()
              assert run_calls in (
                  [login, resolve, apply],
                  [login, resolve, run_fetch, apply],
              ), run_calls
              state = json.loads(machine.succeed("nixos-ami-agent status --json"))
              assert state["last-run"]["outcome"] == "applied", state
              assert state["instance-id"] == "i-0123456789abcdef0", state

          with subtest("the boot's fetch downloaded the closure while the boot went on"):
              machine.wait_until_succeeds("${common.fetchEnded}")
              machine.succeed("${common.fetchSucceeded}")
              machine.succeed("${common.fetchOutcome ref}")
              fetch_calls = machine.succeed(
                  "${common.callsFrom "nixos-ami-agent-fetch.service"}"
              ).splitlines()
              assert fetch_calls in ([login, resolve, boot_fetch], [login, resolve]), fetch_calls
              assert boot_fetch in fetch_calls or run_fetch in run_calls, (run_calls, fetch_calls)
              machine.succeed("journalctl -o cat -u nixos-ami-agent.service | grep -q '^run phases: '")
              status = machine.succeed("nixos-ami-agent status")
              assert "  phases:     " in status, status
              assert "last fetch:" in status, status
              # Switched: the system profile roots the closure, the
              # fetch's GC root is gone.
              machine.succeed("${common.noFetchedLinks}")

          with subtest("the outcome line reaches the console (what smoke-test reads)"):
              machine.wait_for_console_text("nixos-ami-agent: run finished at .*: applied \\(exit 0\\)")

          with subtest("a later switch does not start another run"):
              machine.succeed("/run/current-system/bin/switch-to-configuration test")
              machine.sleep(3)
              assert machine.succeed("${common.runsStarted}").strip() == "1"
      finally:
          machine.shutdown()
          doubles.terminate()
    '';
  }
)
