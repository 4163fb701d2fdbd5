#!/bin/sh
# Builds the Skiff test guest with the host's gcc: build.sh OUTPUT [pvh|linux64]
# pvh (default): ELF with the PVH note; linux64: no note, entered by the Linux 64-bit protocol.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/testguest.elf}
script=$here/linker.ld
[ "${2:-pvh}" = linux64 ] && script=$here/linker-linux64.ld
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
flags="-m64 -O2 -ffreestanding -fno-pic -fno-pie -fno-stack-protector -mno-red-zone -mgeneral-regs-only -fno-asynchronous-unwind-tables -Wall -Wextra -Werror"
gcc $flags -c "$here/entry.S" -o "$tmp/entry.o"
gcc $flags -c "$here/guest.c" -o "$tmp/guest.o"
ld -nostdlib -static -no-pie -z noexecstack -T "$script" -o "$out.tmp" "$tmp/entry.o" "$tmp/guest.o"
mv "$out.tmp" "$out"
