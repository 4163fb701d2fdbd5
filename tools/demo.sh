#!/usr/bin/env bash
# Boots the demo microVM: builds Skiff and the Linux guest (first run: several minutes), then
# boots it with 2 vCPUs and 256 MiB, console on this terminal.
#
# On hardware KVM this reaches a shell (exit it, or run `reboot -f`, to end the VM). On a KVM
# PVM host (nested, instruction emulation) the kernel boots, finds its CPUs, memory and
# devices, and starts init, but user space cannot run there: the first system call faults and
# the kernel panics "Attempted to kill init", after which the VM ends.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "[demo] building skiff" >&2
cargo build --release --locked
dir=$(resources/linux/build.sh auto | tail -n 1)
cmdline="console=ttyS0 reboot=k panic=1 pci=off"
if [ -d /sys/module/kvm_pvm ]; then
	echo "[demo] KVM PVM host: Linux runs by instruction emulation here (about 20-30 s to init)," >&2
	echo "[demo] and its user space cannot run; the VM ends when the kernel panics at init." >&2
	cmdline="$cmdline skiff.no_int3_selftest"
fi
exec target/release/skiff run --kernel "$dir/vmlinux" --initrd "$dir/initramfs.cpio" \
	--vcpus 2 --memory 256 --cmdline "$cmdline"
