#!/usr/bin/env bash
# Start libvirtd without systemd for tests and the demo, if it is not running already.
#
# QEMU runs as root with no security driver: the test guests' images live in
# the work tree, which libvirt-qemu could not traverse, and there is no
# AppArmor/SELinux policy to load in a container. Idempotent; prints the URI.
set -euo pipefail
exec </dev/null

uri=qemu:///system
conf=/etc/libvirt/qemu.conf
marker="# raksha: test setup (scripts/start-libvirtd.sh)"

command -v libvirtd >/dev/null || { echo "start-libvirtd: libvirtd is not installed (run scripts/setup.sh)" >&2; exit 1; }

if ! grep -qF "$marker" "$conf"; then
    printf '\n%s\nuser = "root"\ngroup = "root"\nsecurity_driver = "none"\n' "$marker" >>"$conf"
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
