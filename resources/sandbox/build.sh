#!/usr/bin/env bash
# Builds the sandbox guest's root filesystem from Debian packages: a minbase Debian bookworm
# made by mmdebstrap from deb.debian.org, with Skiff's guest agent (agent/, built static) as
# /usr/sbin/skiff-agent. The kernel runs the agent as PID 1 (init=/usr/sbin/skiff-agent) and
# it mounts what it needs itself, so the image has no init system. The guest mounts the image
# read-only with a tmpfs overlay above it for writes.
#
#   resources/sandbox/build.sh
#
# Outputs are cached under ${XDG_CACHE_HOME:-~/.cache}/skiff/sandbox/<hash>/, keyed by a hash
# of every input (the agent binary included), so a second run takes a moment. The Debian tree
# (the slow part) has a cache of its own, root-<hash>/, keyed by the suite, package set and
# recipe only: a new agent re-runs only mkfs. That tree holds what the mirror had when it was
# first built; bump root_recipe to take newer packages. The last line of stdout is the output
# directory, holding rootfs.ext4. Building needs root (mmdebstrap's root mode, device nodes
# and root-owned files in the image); a cached image does not.
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

say() { echo "[sandbox-image] $*" >&2; }

"$repo/tools/need-packages.sh" mmdebstrap debian-archive-keyring e2fsprogs binutils

suite=bookworm
mirror=http://deb.debian.org/debian
# Packages beyond minbase (Essential, Priority: required, apt). minbase already has sh (dash),
# bash, coreutils, grep, sed, mawk, tar, gzip, findutils, diffutils and util-linux.
include=()
# No manuals, documentation (copyright files stay), translations or info pages. dpkg keeps
# these settings in the image (/etc/dpkg/dpkg.cfg.d/99mmdebstrap), so a package installed in
# a sandbox leaves them out too.
dpkgopts=(
	'path-exclude=/usr/share/man/*'
	'path-exclude=/usr/share/doc/*'
	'path-include=/usr/share/doc/*/copyright'
	'path-exclude=/usr/share/locale/*'
	'path-exclude=/usr/share/info/*'
	'path-exclude=/usr/share/lintian/*'
)
# The tools a sandbox command can count on; the build checks that they run.
tools_check='printf "a\n" | gzip | gzip -d | sed s/a/b/ | awk "{ print }" | grep -qx b &&
	tar --version >/dev/null && ls / >/dev/null && find /etc -maxdepth 0 >/dev/null &&
	bash -c true'

# The agent: statically linked, as it runs with nothing else from the image. The explicit
# --target keeps RUSTFLAGS off build scripts and proc macros, and the artefacts apart from
# the host build's.
say "building skiff-agent (static)"
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release --locked \
	-p skiff-agent --target x86_64-unknown-linux-gnu)
agent=${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu/release/skiff-agent
[ -x "$agent" ] || { say "no agent at $agent"; exit 1; }
headers=$(readelf -lW -dW "$agent")
if grep -q -e INTERP -e NEEDED <<<"$headers"; then
	say "$agent is dynamically linked; the guest image needs it static"
	exit 1
fi

# Bump when the build steps below change what they produce.
root_recipe=1
image_recipe=1
root_key=$(
	{
		echo "root recipe $root_recipe $suite $mirror minbase"
		echo "include ${include[*]}"
		printf 'dpkgopt %s\n' "${dpkgopts[@]}"
		# The merged-/usr hook used below comes with mmdebstrap.
		dpkg-query -W -f='${Package} ${Version}\n' mmdebstrap
	} | sha256sum | cut -c1-16
)
key=$(
	{
		echo "image recipe $image_recipe $root_key"
		dpkg-query -W -f='${Package} ${Version}\n' e2fsprogs
		sha256sum <"$agent"
	} | sha256sum | cut -c1-16
)
base=${XDG_CACHE_HOME:-$HOME/.cache}/skiff/sandbox
cache=$base/$key
if [ -f "$cache/rootfs.ext4" ]; then
	say "cached: $cache"
	echo "$cache"
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	say "building the image needs root (mmdebstrap's root mode, root-owned files and device nodes)"
	exit 1
fi

mkdir -p "$base"
# One build at a time (tests and tools/bench may start this together); the second finds the
# first one's result.
exec 9>"$base/.lock"
flock 9
if [ -f "$cache/rootfs.ext4" ]; then
	say "cached: $cache"
	echo "$cache"
	exit 0
fi
work=$(mktemp -d "$base/build.XXXXXX")
# --one-file-system: should mmdebstrap die with the host's /dev or /proc still mounted in its
# tree, those are left alone.
trap 'rm -rf --one-file-system "$work"' EXIT
start=$(date +%s)

root=$base/root-$root_key
if [ ! -f "$root/packages.txt" ] || [ ! -d "$root/tree" ]; then
	say "mmdebstrap --variant=minbase $suite from $mirror (about 15-30 s)"
	tree=$work/root/tree
	mkdir -p "$work/root"
	args=(--variant=minbase --mode=root --format=directory)
	# Merged /usr by symlinks, as debootstrap does; without it bookworm pulls in the usrmerge
	# package, and perl with it (about 50 MB of 130).
	args+=(--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)
	for o in "${dpkgopts[@]}"; do args+=("--dpkgopt=$o"); done
	for p in "${include[@]}"; do args+=("--include=$p"); done
	# Its own progress lines live, the rest (hooks, dpkg) only when it fails.
	if ! mmdebstrap "${args[@]}" "$suite" "$tree" "$mirror" 2>&1 | tee "$work/mmdebstrap.log" |
		awk '/^[IWE]: / { print "[sandbox-image] mmdebstrap: " $0 > "/dev/stderr"; fflush("/dev/stderr") }'; then
		say "mmdebstrap failed; the end of its output:"
		tail -n 40 "$work/mmdebstrap.log" >&2
		exit 1
	fi

	# Drop what escapes the path excludes (/usr/share/info/dir, made by a maintainer script,
	# and whatever was unpacked before dpkg read them). The host's name and resolver
	# (mmdebstrap copies them) are not the sandbox's.
	find "$tree/usr/share/doc" -type f ! -name copyright -delete
	rm -rf "$tree"/usr/share/{man,locale,info,lintian}/*
	find "$tree/var/log" -type f -delete
	echo sandbox >"$tree/etc/hostname"
	: >"$tree/etc/resolv.conf"
	if [ -n "$(find "$tree/var/lib/apt/lists" -mindepth 1 -maxdepth 1 ! -name lock ! -name partial -print -quit)" ]; then
		say "apt lists were left in the tree"
		exit 1
	fi
	# mmdebstrap's root mode makes /dev's nodes; the kernel opens /dev/console before
	# devtmpfs is mounted over /dev when it is not set to mount it itself.
	if [ ! -c "$tree/dev/console" ] || [ ! -c "$tree/dev/null" ]; then
		say "no /dev nodes in the tree"
		exit 1
	fi
	chroot "$tree" /bin/sh -c "$tools_check" || { say "a basic tool is missing or broken"; exit 1; }
	# shellcheck disable=SC2016 # dpkg-query's own fields
	chroot "$tree" dpkg-query -W -f='${Package} ${Version}\n' >"$work/root/packages.txt"
	rm -rf "$root"
	mv -T "$work/root" "$root"
	say "root tree: $(wc -l <"$root/packages.txt") packages, $(du -sh "$root/tree" | cut -f1)"
fi

say "making rootfs.ext4"
# Hard links make the copy instant; only new files are added to it, so the cached tree is
# never written through them.
cp -al "$root/tree" "$work/tree"
install -m 0755 -o 0 -g 0 "$agent" "$work/tree/usr/sbin/skiff-agent"
# Content plus a quarter and 8 MiB for the file system's own blocks, rounded to 4 MiB; room
# for every inode and 1024 more. No journal and no reserved blocks: the guest mounts the image
# read-only (a tmpfs overlay takes the writes). 4 KiB blocks (page-sized reads, less
# metadata), where mke2fs would pick 1 KiB for a file system this small.
content_kib=$(du -sk "$work/tree" | cut -f1)
inodes=$(find "$work/tree" | wc -l)
size_mib=$(((content_kib * 5 / 4 / 1024 + 8 + 3) / 4 * 4))
truncate -s "${size_mib}M" "$work/rootfs.ext4"
mkfs.ext4 -q -F -b 4096 -L skiff-sandbox -O ^has_journal -m 0 -N $((inodes + 1024)) \
	-E root_owner=0:0 -d "$work/tree" "$work/rootfs.ext4" >&2
e2fsck -fn "$work/rootfs.ext4" >/dev/null 2>&1 || { say "e2fsck found errors in the new image"; exit 1; }

mkdir "$work/out"
mv "$work/rootfs.ext4" "$work/out/"
rm -rf "$cache"
mv -T "$work/out" "$cache"
say "done in $(($(date +%s) - start)) s: ${size_mib} MiB image, $((content_kib / 1024)) MiB content: $cache"
echo "$cache"
