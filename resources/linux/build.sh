#!/usr/bin/env bash
# Builds Skiff's Linux guest from Debian packages only: the kernel from linux-source-6.1 with
# the microVM config kept here, an initramfs around busybox-static, and an ext4 root image.
#
#   resources/linux/build.sh [pvm|kvm|auto]
#
# Flavours: "kvm" is the plain microVM kernel for hardware KVM; "pvm" adds pvm.config and
# the patches in patches/ for KVM PVM hosts (nested, instruction emulation). "auto" (the
# default) picks pvm when /sys/module/kvm_pvm exists.
#
# Outputs are cached under ${XDG_CACHE_HOME:-~/.cache}/skiff/linux/<flavour>-<hash>/, keyed by
# a hash of every input, so a second run takes a moment. The last line of stdout is that
# directory, holding vmlinux, bzImage, initramfs.cpio, rootfs.ext4 and config.
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "$0")" && pwd)
flavour=${1:-auto}
if [ "$flavour" = auto ]; then
	if [ -d /sys/module/kvm_pvm ]; then flavour=pvm; else flavour=kvm; fi
fi
case "$flavour" in pvm | kvm) ;; *) echo "usage: $0 [pvm|kvm|auto]" >&2; exit 2 ;; esac

say() { echo "[linux-guest] $*" >&2; }

"$here/../../tools/need-packages.sh" linux-source-6.1 busybox-static e2fsprogs bc flex bison \
	libelf-dev xz-utils gcc libc6-dev make patch

tarball=/usr/src/linux-source-6.1.tar.xz
busybox=/bin/busybox
fragment=$here/$flavour.config
[ "$flavour" = kvm ] && fragment=$here/hwkvm.config
patches=()
[ "$flavour" = pvm ] && patches=("$here"/patches/*.patch)

# Bump when the build steps below change what they produce.
kernel_recipe=4
images_recipe=5
kernel_key=$(
	{
		echo "kernel recipe $kernel_recipe $flavour"
		dpkg-query -W -f='${Package} ${Version}\n' linux-source-6.1
		gcc --version | head -n 1
		cat "$here/microvm.config" "$fragment" "$here/required.txt"
		for p in "${patches[@]}"; do cat "$p"; done
	} | sha256sum | cut -c1-16
)
key=$(
	{
		echo "images recipe $images_recipe $kernel_key"
		dpkg-query -W -f='${Package} ${Version}\n' busybox-static e2fsprogs libc6-dev
		gcc --version | head -n 1
		cat "$here/init" "$here/skiff-guest.c"
	} | sha256sum | cut -c1-16
)
base=${XDG_CACHE_HOME:-$HOME/.cache}/skiff/linux
cache=$base/$flavour-$key
if [ -f "$cache/vmlinux" ] && [ -f "$cache/bzImage" ] && [ -f "$cache/initramfs.cpio" ] && [ -f "$cache/rootfs.ext4" ]; then
	say "cached: $cache"
	echo "$cache"
	exit 0
fi

mkdir -p "$base"
# One build at a time (tests and tools/bench may start this together); the second finds the
# first one's result.
exec 9>"$base/.lock"
flock 9
if [ -f "$cache/vmlinux" ] && [ -f "$cache/bzImage" ] && [ -f "$cache/initramfs.cpio" ] && [ -f "$cache/rootfs.ext4" ]; then
	say "cached: $cache"
	echo "$cache"
	exit 0
fi
work=$(mktemp -d "$base/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

# The kernel (the slow part) has a cache of its own, so a change to the images alone does not
# rebuild it.
kernel=$base/kernel-$flavour-$kernel_key
if [ ! -f "$kernel/vmlinux" ] || [ ! -f "$kernel/bzImage" ] || [ ! -x "$kernel/gen_init_cpio" ]; then
	say "unpacking $(basename "$tarball")"
	tar -C "$work" -xf "$tarball"
	src=$work/linux-source-6.1
	for p in "${patches[@]}"; do
		say "applying $(basename "$p")"
		patch -s -d "$src" -p1 <"$p"
	done

	say "configuring ($flavour): tinyconfig + microvm.config + $(basename "$fragment")"
	make -s -C "$src" tinyconfig >/dev/null
	"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/microvm.config" "$fragment" >/dev/null
	make -s -C "$src" olddefconfig >/dev/null
	while read -r line; do
		case "$line" in '' | '#'*) continue ;; esac
		if ! grep -qx "$line" "$src/.config"; then
			say "config check failed: $line did not survive olddefconfig"
			exit 1
		fi
	done <"$here/required.txt"

	jobs=$(nproc)
	say "building vmlinux and bzImage with $jobs jobs (about 4 minutes on 2 cores)"
	make -C "$src" -j"$jobs" vmlinux bzImage 2>&1 | awk '
		/^ *(CC|AS|LD|AR)/ { n++; if (n % 250 == 0) { printf "[linux-guest] %d objects built\n", n > "/dev/stderr"; fflush("/dev/stderr") } }
		/: error:|Error [0-9]/ { print > "/dev/stderr" }'
	[ -f "$src/vmlinux" ] && [ -f "$src/arch/x86/boot/bzImage" ] || { say "kernel build failed"; exit 1; }
	mkdir "$work/kernel"
	cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" "$work/kernel/"
	cp "$src/.config" "$work/kernel/config"
	gcc -O2 -o "$work/kernel/gen_init_cpio" "$src/usr/gen_init_cpio.c"
	rm -rf "$kernel" "$src"
	mv -T "$work/kernel" "$kernel"
fi

say "making initramfs and root image"
gcc -O2 -Wall -static -o "$work/skiff-guest" "$here/skiff-guest.c"
cat >"$work/initramfs.list" <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /bin 0755 0 0
dir /sbin 0755 0 0
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /tmp 1777 0 0
dir /mnt 0755 0 0
file /bin/busybox $busybox 0755 0 0
file /init $here/init 0755 0 0
file /bin/skiff-guest $work/skiff-guest 0755 0 0
LIST
# Every applet's link is made here rather than by `busybox --install` at boot, which costs
# about 10 s of emulated system calls on a KVM PVM host.
applets=$("$busybox" --list | grep -v -x busybox)
for a in $applets; do echo "slink /bin/$a busybox 0777 0 0"; done >>"$work/initramfs.list"
"$kernel/gen_init_cpio" "$work/initramfs.list" >"$work/initramfs.cpio"

root=$work/rootfs
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,mnt,etc,root}
cp "$busybox" "$root/bin/busybox"
for a in $applets; do ln -s busybox "$root/bin/$a"; done
cp "$here/init" "$root/sbin/init"
cp "$work/skiff-guest" "$root/bin/skiff-guest"
echo "skiff" >"$root/etc/hostname"
mkfs.ext4 -q -F -L skiff-root -E root_owner=0:0 -d "$root" "$work/rootfs.ext4" 64M

mkdir "$work/out"
cp "$kernel/vmlinux" "$kernel/bzImage" "$kernel/config" "$work/initramfs.cpio" "$work/rootfs.ext4" "$work/out/"
rm -rf "$cache"
mv -T "$work/out" "$cache"
say "done in $(($(date +%s) - start)) s: $cache"
echo "$cache"
