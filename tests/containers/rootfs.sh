#!/usr/bin/env bash
# Builds (once) the minimal Debian rootfs the container boot tests boot
# with systemd-nspawn, and prints its path. Cached outside the checkout;
# rebuilt when missing or when this script's recipe version changes.
set -euo pipefail

VERSION=2  # bump when the recipe below changes
cache="${NIXOS_AMI_AGENT_TEST_CACHE:-/var/cache/nixos-ami-agent-tests}"
root="$cache/rootfs-bookworm-v$VERSION"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [ -f "$root/.complete" ]; then
  echo "$root"
  exit 0
fi

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.rootfs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "building the container rootfs in $tmp (debootstrap, about a minute)" >&2
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,dbus,iproute2,libpam-systemd,ca-certificates \
  bookworm "$tmp" "$mirror" >&2

# No documentation or locales: smaller, faster overlays.
rm -rf "$tmp"/usr/share/doc/* "$tmp"/usr/share/man/* "$tmp"/usr/share/locale/* \
       "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
# Every scenario is a first boot of a new machine: systemd must generate
# the machine id, not copy one from the build.
rm -f "$tmp/var/lib/dbus/machine-id"
echo uninitialized > "$tmp/etc/machine-id"
# No prompts, no consoles waiting for a terminal.
for unit in systemd-firstboot.service console-getty.service getty@.service \
            systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer; do
  ln -sf /dev/null "$tmp/etc/systemd/system/$unit"
done
# A persistent journal, read from outside after the container exits.
mkdir -p "$tmp/var/log/journal"
touch "$tmp/.complete"

mv "$tmp" "$root"
trap - EXIT
echo "$root"
