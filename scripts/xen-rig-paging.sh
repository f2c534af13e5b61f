#!/bin/sh
# Rebuilds the xen-rig's hypervisor (../shared/xen-rig, Debian's Xen 4.17
# source, already unpacked there by `XEN_SHADOW=1 run.sh prepare`) with
# memory paging as well as shadow paging, and installs it where the rig
# boots its shadow-paging hypervisor from. Memory paging is what post-copy
# on Xen needs; Xen only builds it with CONFIG_UNSUPPORTED=y.
#
#   scripts/xen-rig-paging.sh        # about 3 minutes on 2 cores; as root
set -eu
work=${WORK:-/tmp/xen-rig-work}
R=$work/rootfs
[ -f "$work/boot/xen-shadow.paging" ] && { cp "$work/boot/xen-shadow.paging" "$work/boot/xen-shadow"; exit 0; }
ls -d "$work"/xen-src/xen-4.17*/ > /dev/null || { echo "run XEN_SHADOW=1 run.sh prepare first" >&2; exit 1; }
cleanup() { for m in usr/src/xen dev sys proc; do mountpoint -q "$R/$m" && umount "$R/$m"; done; true; }
trap cleanup EXIT
mountpoint -q "$R/usr/src/xen" || mount --bind "$work/xen-src" "$R/usr/src/xen"
for m in proc sys dev; do mountpoint -q "$R/$m" || mount --bind "/$m" "$R/$m"; done
chroot "$R" sh -c 'set -e
cd /usr/src/xen/xen-4.17*/
cp debian/xen-kconfig xen/.config
printf "CONFIG_SHADOW_PAGING=y\nCONFIG_EXPERT=y\nCONFIG_UNSUPPORTED=y\nCONFIG_MEM_PAGING=y\n" >> xen/.config
make -C xen olddefconfig XEN_TARGET_ARCH=x86_64 > /dev/null
grep -q "^CONFIG_MEM_PAGING=y" xen/.config
grep -q "^CONFIG_SHADOW_PAGING=y" xen/.config
make -j"$(nproc)" -C xen XEN_TARGET_ARCH=x86_64 > ../build-paging.log 2>&1 || { tail -30 ../build-paging.log; exit 1; }
cp xen/xen ../xen-paging'
[ -f "$work/boot/xen-shadow.orig" ] || cp "$work/boot/xen-shadow" "$work/boot/xen-shadow.orig"
cp "$work/xen-src/xen-paging" "$work/boot/xen-shadow.paging"
cp "$work/boot/xen-shadow.paging" "$work/boot/xen-shadow"
echo "installed $work/boot/xen-shadow with CONFIG_MEM_PAGING=y and CONFIG_SHADOW_PAGING=y"
