#!/usr/bin/env bash
# Boots the demo microVM: builds Skiff and the Linux guest (first run: several minutes), then
# boots it with 2 vCPUs and 256 MiB, console on this terminal, to a busybox shell. `reboot -f`
# in the shell (or Ctrl-Alt-Del through the API) ends the VM.
#
# SKIFF=PATH uses that skiff binary instead of building one, SKIFF_LINUX_DIR=DIR that built
# guest (the tests run the demo so).
set -euo pipefail
cd "$(dirname "$0")/.."

skiff=${SKIFF:-}
if [ -z "$skiff" ]; then
	echo "[demo] building skiff" >&2
	cargo build --release --locked
	skiff=target/release/skiff
fi
dir=${SKIFF_LINUX_DIR:-$(resources/linux/build.sh auto | tail -n 1)}
cmdline="console=ttyS0 reboot=k panic=1 pci=off"
if [ -d /sys/module/kvm_pvm ]; then
	echo "[demo] KVM PVM host: the guest kernel runs under instruction emulation here, so the" >&2
	echo "[demo] shell comes after about a minute and each command takes a moment (see" >&2
	echo "[demo] README, KVM PVM hosts)." >&2
fi
exec "$skiff" --log-level info run --kernel "$dir/vmlinux" \
	--initrd "$dir/initramfs.cpio" --vcpus 2 --memory 256 --cmdline "$cmdline"
