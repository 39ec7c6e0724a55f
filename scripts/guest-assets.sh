#!/usr/bin/env bash
# Builds the Linux guest assets for vinfra's Linux boot path from Debian packages, into
# assets/guest/ (ignored by git):
#   vmlinuz        the Debian linux-image-amd64 kernel (bzImage)
#   vmlinux        the same kernel, uncompressed (ELF, 64-bit entry, no decompressor)
#   initramfs.cpio.gz  busybox-static + the virtio modules + an init script that loads them
#   disk.ext4      a small ext4 image with /hello.txt
#   cmdline        a suggested kernel command line
# Idempotent and cached: downloads go to assets/guest/cache/, outputs are rebuilt only when the
# kernel package version changes or an output is missing. Needs apt-get (Debian/Ubuntu), run as
# root or with the tools present: dpkg-deb, xz, zstd, cpio, mkfs.ext4.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${VINFRA_GUEST_ASSETS:-$ROOT/assets/guest}"
CACHE="$OUT/cache"
mkdir -p "$CACHE"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need cpio || ! need mkfs.ext4 || ! need xz || ! need zstd; then
    apt-get update -qq && apt-get install -y -qq cpio e2fsprogs xz-utils zstd >/dev/null
fi

# Resolve the real kernel package behind the linux-image-amd64 metapackage.
if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then apt-get update -qq; fi
KPKG="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
[ -n "$KPKG" ] || { echo "guest-assets: cannot resolve linux-image-amd64" >&2; exit 1; }
KVER_PKG="$(apt-cache policy "$KPKG" | awk '/Candidate:/ {print $2}')"
STAMP="$KPKG $KVER_PKG"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$STAMP" ] \
    && [ -f "$OUT/vmlinux" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ] && [ -f "$OUT/disk.ext4" ]; then
    echo "guest-assets: up to date ($STAMP) in $OUT"
    exit 0
fi

cd "$CACHE"
for p in "$KPKG" busybox-static; do
    ls "$p"_*.deb >/dev/null 2>&1 || apt-get download -qq "$p"
done
rm -rf "$CACHE/kernel" "$CACHE/busybox"
dpkg-deb -x "$(ls "$KPKG"_*.deb | head -1)" "$CACHE/kernel"
dpkg-deb -x "$(ls busybox-static_*.deb | head -1)" "$CACHE/busybox"

VMLINUZ="$(ls "$CACHE"/kernel/boot/vmlinuz-* | head -1)"
KVER="${VMLINUZ##*/vmlinuz-}"
cp "$VMLINUZ" "$OUT/vmlinuz"

# Uncompressed kernel: find the compressed payload inside the bzImage and decompress it
# (what the kernel's scripts/extract-vmlinux does).
extract() {
    local magic="$1" cmd="$2" off
    for off in $(LC_ALL=C grep -obUaP "$magic" "$VMLINUZ" | cut -d: -f1); do
        tail -c +"$((off + 1))" "$VMLINUZ" | $cmd > "$OUT/vmlinux.tmp" 2>/dev/null || true
        if [ "$(head -c 4 "$OUT/vmlinux.tmp" 2>/dev/null)" = $'\x7fELF' ]; then
            mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
            return 0
        fi
    done
    return 1
}
extract '\xFD\x37\x7A\x58\x5A\x00' 'xz -dc' \
    || extract '\x28\xB5\x2F\xFD' 'zstd -dc' \
    || extract '\x1F\x8B\x08' 'gzip -dc' \
    || { rm -f "$OUT/vmlinux.tmp"; echo "guest-assets: could not extract vmlinux" >&2; exit 1; }

# initramfs: busybox, the virtio modules (with their dependencies, in load order), init.
MODDIR="$CACHE/kernel/lib/modules/$KVER"
IRD="$CACHE/initramfs"
rm -rf "$IRD"
mkdir -p "$IRD"/{bin,dev,proc,sys,mnt,modules}
cp "$CACHE/busybox/bin/busybox" "$IRD/bin/busybox"
ORDER=()
# Finds a module file by name (module names use '_' where file names may use '-').
module_path() {
    local name="$1" alt="${1//_/-}" f
    f="$(find "$MODDIR/kernel" \( -name "$name.ko*" -o -name "$alt.ko*" \) | head -1)"
    echo "${f#"$MODDIR/"}"
}
# Its dependencies, from the `depends=` entry of its .modinfo section (no depmod needed).
module_deps() {
    local f="$MODDIR/$1"
    case "$f" in
        *.xz) xz -dc "$f" ;; *.zst) zstd -qdc "$f" ;; *) cat "$f" ;;
    esac | tr '\0' '\n' | sed -n 's/^depends=//p' | head -1 | tr ',' ' '
}
add_module() {
    local name="$1" path dep seen
    path="$(module_path "$name")"
    [ -n "$path" ] || { echo "guest-assets: module $name not found (built in?)" >&2; return 0; }
    for seen in "${ORDER[@]:-}"; do [ "$seen" = "$path" ] && return 0; done
    for dep in $(module_deps "$path"); do add_module "$dep"; done
    ORDER+=("$path")
}
for m in virtio virtio_ring virtio_mmio virtio_blk virtio_net virtio_console virtio_rng virtio_balloon; do
    add_module "$m"
done
: > "$IRD/modules/order"
for path in "${ORDER[@]}"; do
    base="${path##*/}"
    case "$base" in
        *.ko.xz) xz -dc "$MODDIR/$path" > "$IRD/modules/${base%.xz}"; base="${base%.xz}" ;;
        *.ko.zst) zstd -qdc "$MODDIR/$path" > "$IRD/modules/${base%.zst}"; base="${base%.zst}" ;;
        *) cp "$MODDIR/$path" "$IRD/modules/$base" ;;
    esac
    echo "$base" >> "$IRD/modules/order"
done
cat > "$IRD/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "vinfra: init started"
for m in $(cat /modules/order); do insmod /modules/$m && echo "vinfra: loaded $m"; done
echo "vinfra: virtio devices:"; ls /sys/bus/virtio/devices 2>/dev/null
if [ -b /dev/vda ] && mount -t ext4 -o ro /dev/vda /mnt; then cat /mnt/hello.txt; umount /mnt; fi
[ -c /dev/hwrng ] && echo "vinfra: hwrng $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
ip link 2>/dev/null | grep -q eth0 && echo "vinfra: eth0 present"
echo "vinfra: init done"
exec sh
INIT
chmod +x "$IRD/init"
(cd "$IRD" && find . | cpio -o -H newc --quiet | gzip -9) > "$OUT/initramfs.cpio.gz"

# Disk image.
DISKDIR="$CACHE/disk"
rm -rf "$DISKDIR" && mkdir -p "$DISKDIR"
echo "vinfra: hello from the ext4 disk" > "$DISKDIR/hello.txt"
rm -f "$OUT/disk.ext4"
mkfs.ext4 -q -F -L vinfra -d "$DISKDIR" "$OUT/disk.ext4" 64M

echo "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 acpi=on" > "$OUT/cmdline"
echo "$STAMP" > "$OUT/stamp"
echo "guest-assets: built $STAMP ($KVER) in $OUT:"
ls -l "$OUT" | grep -v cache
