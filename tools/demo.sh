#!/usr/bin/env bash
# Boots the demo microVM: builds Skiff and the Linux guest (first run: several minutes), then
# boots it with 2 vCPUs (1 on a KVM PVM host) and 256 MiB, console on this terminal.
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
vcpus=2
if [ -d /sys/module/kvm_pvm ]; then
	echo "[demo] KVM PVM host: Linux runs largely by instruction emulation here (about 40 s to" >&2
	echo "[demo] init), its user space cannot run (the VM ends when the kernel panics at init)," >&2
	echo "[demo] and its SMP bring-up stalls, so the demo uses 1 vCPU. See README, KVM PVM hosts." >&2
	vcpus=1
fi
exec target/release/skiff --log-level info run --kernel "$dir/vmlinux" \
	--initrd "$dir/initramfs.cpio" --vcpus "$vcpus" --memory 256 --cmdline "$cmdline"
