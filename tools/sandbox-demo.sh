#!/usr/bin/env bash
# The sandbox demo: builds Skiff, the guest kernel and the sandbox image (first run: several
# minutes), prepares a sandbox once (a boot of the guest, about 20 s on a KVM PVM host), then
# runs a command in a fresh clone of it and prints how long each step took:
#
#   tools/sandbox-demo.sh                 # a greeting from inside
#   tools/sandbox-demo.sh -- CMD ARGS...  # any command
#
# The prepared sandbox is kept under ~/.cache/skiff/sandbox-demo/, keyed by the skiff binary,
# the kernel and the image, so later runs only restore a clone. SKIFF=PATH uses that skiff
# binary instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "${1:-}" = -- ] && shift
if [ $# -eq 0 ]; then
	# shellcheck disable=SC2016 # expanded by the guest's shell
	set -- sh -c 'echo "hello from $(hostname), $(uname -sr), Debian $(cat /etc/debian_version), as $(id -un) in $(pwd)"'
fi

skiff=${SKIFF:-}
if [ -z "$skiff" ]; then
	echo "[sandbox-demo] building skiff" >&2
	cargo build --release --locked -q
	skiff=target/release/skiff
fi
kernel=$(resources/linux/build.sh auto | tail -n 1)/vmlinux
rootfs=$(resources/sandbox/build.sh | tail -n 1)/rootfs.ext4
key=$(cat "$skiff" "$kernel" "$rootfs" | sha256sum | cut -c1-16)
base=${XDG_CACHE_HOME:-$HOME/.cache}/skiff/sandbox-demo
dir=$base/$key
if [ ! -f "$dir/sandbox.json" ]; then
	rm -rf "$base"
	mkdir -p "$base"
	echo "[sandbox-demo] preparing the sandbox (one boot of the guest)" >&2
	"$skiff" sandbox prepare --kernel "$kernel" --rootfs "$rootfs" --out "$dir"
fi
exec "$skiff" sandbox run "$dir" --timings -- "$@"
