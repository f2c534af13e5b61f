#!/bin/sh
# Builds the test guest as a multiboot ELF image with binutils (as, ld,
# objcopy): ./build.sh [OUTDIR], default target/payload in the workspace.
# Also writes payload.bin, the payload's bytes alone.
# The image is a 32-bit ELF (what multiboot loaders take) holding the
# 32-bit boot stub and the 64-bit payload.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../../target/payload}
mkdir -p "$out"
as --64 -o "$out/payload.o" "$here/payload.S"
ld -m elf_x86_64 -n --no-warn-rwx-segments -T "$here/payload.ld" -o "$out/payload64.elf" "$out/payload.o"
objcopy -I elf64-x86-64 -O elf32-i386 "$out/payload64.elf" "$out/payload.elf"
objcopy -O binary --only-section=.payload "$out/payload64.elf" "$out/payload.bin"
echo "$out/payload.elf"
