#!/bin/sh
# Builds the Skiff test guest (a PVH ELF) with the host's gcc: build.sh OUTPUT
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/testguest.elf}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
flags="-m64 -O2 -ffreestanding -fno-pic -fno-pie -fno-stack-protector -mno-red-zone -mgeneral-regs-only -fno-asynchronous-unwind-tables -Wall -Wextra -Werror"
gcc $flags -c "$here/entry.S" -o "$tmp/entry.o"
gcc $flags -c "$here/guest.c" -o "$tmp/guest.o"
ld -nostdlib -static -no-pie -z noexecstack -T "$here/linker.ld" -o "$out.tmp" "$tmp/entry.o" "$tmp/guest.o"
mv "$out.tmp" "$out"
