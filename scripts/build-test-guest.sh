#!/usr/bin/env bash
# Build (and cache) a tiny bootable Linux test guest shared by the tests and the demo:
#   - vmlinuz:        Debian's cloud kernel (linux-image-cloud-amd64 -> linux-image-<abi>-cloud-amd64),
#   - initramfs.img:  gzip'd cpio (newc) with busybox-static, qemu-ga and the libraries it links,
#                     the virtio kernel modules the cloud kernel builds as modules, and an /init that
#                     mounts ext4 data disks at /mnt/vdX and runs qemu-ga on org.qemu.guest_agent.0,
#   - stamp:          the package versions and the recipe hash this build came from.
# See docs/design/test-guests.md.
#
# Usage:
#   scripts/build-test-guest.sh                       build into the cache (no-op when up to date)
#   scripts/build-test-guest.sh --force               rebuild even if the cache is up to date
#   scripts/build-test-guest.sh data-disk OUT SIZE [DIR]
#                                                     write an ext4 image OUT of SIZE (e.g. 64M),
#                                                     filled from DIR if given (mkfs.ext4 -d)
# Cache: ${RAKSHA_GUEST_CACHE:-/var/cache/raksha/test-guest}. Prints the cache dir on stdout.
# Runs as root with no stdin; installs qemu-system-x86, e2fsprogs, busybox-static, cpio only if missing.
set -euo pipefail
umask 022

CACHE="${RAKSHA_GUEST_CACHE:-/var/cache/raksha/test-guest}"
SELF="$(readlink -f "${BASH_SOURCE[0]}")"
KERNEL_META=linux-image-cloud-amd64
# Modules the guest needs; any the kernel has built in are skipped, the rest are loaded with their deps.
WANT_MODULES=(virtio_pci virtio_blk virtio_console virtio_net ext4)

say() { printf 'build-test-guest: %s\n' "$*" >&2; }
die() { printf 'build-test-guest: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- data disks
if [[ "${1:-}" == data-disk ]]; then
    [[ $# -ge 3 ]] || die "usage: $0 data-disk OUT SIZE [DIR]"
    out="$2" size="$3" dir="${4:-}"
    command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 missing (apt-get install e2fsprogs)"
    rm -f "$out"
    truncate -s "$size" "$out"
    args=(-q -F -t ext4 -L raksha-data -E root_owner=0:0)
    [[ -n "$dir" ]] && args+=(-d "$dir")
    mkfs.ext4 "${args[@]}" "$out"
    chmod 644 "$out"
    printf '%s\n' "$out"
    exit 0
fi

FORCE=0
[[ "${1:-}" == --force ]] && FORCE=1

# The recipe hash changes whenever this script changes, so an edited /init is rebuilt.
RECIPE="$(sha256sum "$SELF" | cut -c1-16)"
STAMP="$CACHE/stamp"
if [[ $FORCE == 0 && -f "$STAMP" && -f "$CACHE/vmlinuz" && -f "$CACHE/initramfs.img" ]] \
    && grep -qx "recipe=$RECIPE" "$STAMP"; then
    printf '%s\n' "$CACHE"
    exit 0
fi

[[ $EUID -eq 0 ]] || die "must run as root (installs packages, writes $CACHE)"
exec </dev/null

# One build at a time per cache; whoever waited finds the cache built and stops.
mkdir -p "$(dirname "$CACHE")"
exec 9>"$(dirname "$CACHE")/.$(basename "$CACHE").lock"
flock 9
if [[ $FORCE == 0 && -f "$STAMP" ]] && grep -qx "recipe=$RECIPE" "$STAMP"; then
    printf '%s\n' "$CACHE"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive

# ---------------------------------------------------------------- host packages
missing=()
for pkg in qemu-system-x86 e2fsprogs busybox-static cpio; do
    [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" == "install ok installed" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt_install() { apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${missing[@]}"; }
    apt_install >&2 || { apt-get -o DPkg::Lock::Timeout=600 update >&2 && apt_install >&2; } \
        || die "apt-get install ${missing[*]} failed"
fi

# ---------------------------------------------------------------- downloads
# umask 022: directories created here are 755 (existing parents, e.g. /tmp, are left alone)
mkdir -p "$(dirname "$CACHE")"
WORK="$(mktemp -d "$(dirname "$CACHE")/.build-test-guest.XXXXXX")"
chmod 755 "$WORK"
trap 'rm -rf "$WORK"' EXIT
DL="$WORK/debs"
mkdir -p "$DL"
# apt-get download drops privileges to _apt when it can write the target dir.
id _apt >/dev/null 2>&1 && chown _apt "$DL"

KERNEL_PKG="$(apt-cache depends "$KERNEL_META" | awk '/Depends: linux-image-.*-cloud-amd64/ {print $2; exit}')"
[[ -n "$KERNEL_PKG" ]] || die "cannot resolve the kernel package $KERNEL_META depends on (apt-get update?)"
say "downloading $KERNEL_META $KERNEL_PKG qemu-guest-agent"
(cd "$DL" && apt-get download "$KERNEL_META" "$KERNEL_PKG" qemu-guest-agent >&2 2>&1) \
    || die "apt-get download failed"

deb_version() { dpkg-deb -f "$(ls "$DL"/"$1"_*.deb)" Version; }
V_KERNEL="$(deb_version "$KERNEL_PKG")"
V_QGA="$(deb_version qemu-guest-agent)"
V_BUSYBOX="$(dpkg-query -W -f='${Version}' busybox-static)"

KROOT="$WORK/kernel"
QROOT="$WORK/qga"
dpkg-deb -x "$DL/$(basename "$(ls "$DL"/"$KERNEL_PKG"_*.deb)")" "$KROOT"
dpkg-deb -x "$(ls "$DL"/qemu-guest-agent_*.deb)" "$QROOT"

VMLINUZ="$(ls "$KROOT"/boot/vmlinuz-* | head -n1)"
[[ -f "$VMLINUZ" ]] || die "no boot/vmlinuz-* in $KERNEL_PKG"
KVER="${VMLINUZ##*/vmlinuz-}"
MODDIR="$KROOT/lib/modules/$KVER"

# ---------------------------------------------------------------- initramfs tree
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,mnt,root,var,lib/modules}
ln -s ../run "$ROOT/var/run"
chmod 1777 "$ROOT/tmp"

# busybox-static and its applets
cp /bin/busybox "$ROOT/bin/busybox"
for applet in $("$ROOT/bin/busybox" --list); do
    [[ "$applet" == busybox ]] && continue
    [[ -e "$ROOT/bin/$applet" ]] || ln -s busybox "$ROOT/bin/$applet"
done

# qemu-ga with every shared library it links, at the same paths (the loader included)
cp "$QROOT/usr/sbin/qemu-ga" "$ROOT/usr/sbin/qemu-ga"
ldd_out="$(ldd "$QROOT/usr/sbin/qemu-ga")" || die "ldd qemu-ga failed"
if grep -q 'not found' <<<"$ldd_out"; then
    die "qemu-ga needs libraries missing on this host: $(grep 'not found' <<<"$ldd_out" | tr -s ' \t\n' ' ')"
fi
while read -r lib; do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done < <(awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]+ \(/ {print $1}' <<<"$ldd_out" | sort -u)

# kernel modules: those not built in, plus their dependencies (from the .modinfo depends= field,
# the same data depmod writes to modules.dep, which the .deb does not ship), in load order
declare -A KO=()
while read -r f; do
    n="${f##*/}"; n="${n%%.ko*}"; KO["${n//-/_}"]="$f"
done < <(find "$MODDIR/kernel" -name '*.ko*')
is_builtin() { grep -qE "/${1//_/[-_]}\.ko$" "$MODDIR/modules.builtin"; }
LOAD=()
declare -A SEEN=()
resolve() {
    local m="${1//-/_}" f deps d
    [[ -n "${SEEN[$m]:-}" ]] && return 0
    SEEN[$m]=1
    is_builtin "$m" && return 0
    f="${KO[$m]:-}"
    [[ -n "$f" ]] || die "kernel module $m is neither built in nor shipped in $KERNEL_PKG"
    case "$f" in
        *.ko.xz) xz -dc "$f" >"$WORK/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$WORK/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$WORK/$m.ko" ;;
        *) cp "$f" "$WORK/$m.ko" ;;
    esac
    deps="$(tr '\0' '\n' <"$WORK/$m.ko" | sed -n 's/^depends=//p' | head -n1)"
    for d in ${deps//,/ }; do resolve "$d"; done
    mv "$WORK/$m.ko" "$ROOT/lib/modules/$m.ko"
    LOAD+=("$m")
}
for m in "${WANT_MODULES[@]}"; do resolve "$m"; done
printf '%s\n' "${LOAD[@]}" >"$ROOT/etc/modules-load"
say "kernel $KVER; modules loaded at boot: ${LOAD[*]:-(none, all built in)}"

cat >"$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
cat >"$ROOT/etc/group" <<'EOF'
root:x:0:
EOF

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
# Raksha test guest /init (PID 1). Never exits.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/virtio-ports
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=755 tmpfs /run
echo 1 >/proc/sys/kernel/printk 2>/dev/null

for m in $(cat /etc/modules-load); do
    insmod "/lib/modules/$m.ko" || echo "init: insmod $m failed" >/dev/console
done

# Wait (up to ~10 s) for the agent's virtio-serial port, then name it like udev would.
i=0
while [ $i -lt 100 ] && ! grep -qsx org.qemu.guest_agent.0 /sys/class/virtio-ports/*/name; do
    sleep 0.1; i=$((i + 1))
done
for p in /sys/class/virtio-ports/*; do
    [ -f "$p/name" ] || continue
    name=$(cat "$p/name")
    [ -n "$name" ] && ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$name"
done

# Mount every ext4 virtio disk read-write at /mnt/vdX (the initramfs is the root fs, so the
# first disk is vda). Disks that are not ext4 (raw test data) are left alone.
for dev in /dev/vd[a-z]; do
    [ -b "$dev" ] || continue
    n=${dev#/dev/}
    mkdir -p "/mnt/$n"
    if mount -t ext4 -o rw "$dev" "/mnt/$n" 2>/dev/null; then
        echo "init: mounted $dev at /mnt/$n" >/dev/console
    else
        rmdir "/mnt/$n"
    fi
done

# The guest agent, restarted if it dies.
(
    while :; do
        if [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]; then
            qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run \
                -l /run/qemu-ga.log
            echo "init: qemu-ga exited ($?), restarting" >/dev/console
        fi
        sleep 1
    done
) &

echo "init: raksha test guest ready" >/dev/console
# A shell on the console for the demo / debugging; PID 1 itself just sleeps.
(
    while :; do
        setsid cttyhack sh -l </dev/console >/dev/console 2>&1
        sleep 1
    done
) &
while :; do sleep 3600; done
EOF
chmod 755 "$ROOT/init"

INITRD="$WORK/initramfs.img"
(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) \
    | gzip -9n >"$INITRD"

# ---------------------------------------------------------------- install into the cache
mkdir -p "$CACHE"
cp "$VMLINUZ" "$CACHE/vmlinuz.new"
mv "$INITRD" "$CACHE/initramfs.img.new"
mv -f "$CACHE/vmlinuz.new" "$CACHE/vmlinuz"
mv -f "$CACHE/initramfs.img.new" "$CACHE/initramfs.img"
cat >"$STAMP.new" <<EOF
recipe=$RECIPE
kernel_package=$KERNEL_PKG
kernel_version=$V_KERNEL
kernel_release=$KVER
qemu_guest_agent=$V_QGA
busybox_static=$V_BUSYBOX
modules=${LOAD[*]}
EOF
mv -f "$STAMP.new" "$STAMP"
chmod 755 "$CACHE"
chmod 644 "$CACHE/vmlinuz" "$CACHE/initramfs.img" "$STAMP"
say "built $(du -h "$CACHE/initramfs.img" | cut -f1) initramfs + kernel $KVER in $CACHE"
printf '%s\n' "$CACHE"
