#!/usr/bin/env bash
# Start libvirtd without systemd for tests and the demo, if it is not running already.
#
# libvirt's own settings are kept: QEMU runs as libvirt-qemu (Debian's default), so
# every image it opens must be in folders that user can traverse. Idempotent;
# prints the URI.
set -euo pipefail
exec </dev/null

uri=qemu:///system
conf=/etc/libvirt/qemu.conf
marker="# raksha: test setup (scripts/start-libvirtd.sh)"

command -v libvirtd >/dev/null || { echo "start-libvirtd: libvirtd is not installed (run scripts/setup.sh)" >&2; exit 1; }

# Earlier versions ran QEMU as root here: take their lines out again, and restart a libvirtd that read them.
restart=
if grep -qF "$marker" "$conf"; then
    sed -i "\\|^$marker\$|,+3d" "$conf"
    restart=1
fi

# /dev/kvm as Debian's udev rule leaves it (group kvm, which libvirt-qemu is in): without udev it is
# root's alone, and libvirt then probes QEMU's capabilities again at every domain start (~80 s).
if [ -c /dev/kvm ] && [ "$(stat -c %G:%a /dev/kvm)" != kvm:660 ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

if [ -n "$restart" ] && pgrep -x libvirtd >/dev/null; then
    pkill -x libvirtd || true
    for _ in $(seq 1 300); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
fi

if virsh -c "$uri" version >/dev/null 2>&1; then
    echo "$uri"
    exit 0
fi

mkdir -p /run/libvirt /var/run/libvirt
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 100); do
    if virsh -c "$uri" version >/dev/null 2>&1; then
        echo "$uri"
        exit 0
    fi
    sleep 0.1
done
echo "start-libvirtd: libvirtd did not answer on $uri within 10 s" >&2
exit 1
