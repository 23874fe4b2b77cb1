#!/bin/bash
# Stand-in for SFPI's riscv-tt-elf-g++, installed by ttswap.mock so that ttnn can run in mock mode.
#
# Mock devices never execute a kernel, but tt-metal still builds every kernel it dispatches and loads
# the resulting ELF. So this script:
#   * reports the exact SFPI release the wheel's pre-compiled firmware was built with, which makes
#     tt-metal pick that firmware instead of building its own;
#   * turns every compile into an empty object;
#   * turns every link into a tiny kernel ELF laid out by the wheel's own linker script. The ELF
#     carries a relocation section because tt-metal's loader refuses ELFs without one.
# ttswap.mock fills in the @NAME@ fields, shell-quoted, when it installs this file.

banner=@BANNER@
binutils=@BINUTILS_BIN@
stubs=@STUB_DIR@

if [ "${1:-}" = --version ]; then
  echo "$banner"
  exit 0
fi

output='' depfile='' compile_only=0 script='' start_object='' ld_options=()
while [ $# -gt 0 ]; do
  case "$1" in
    -o) output=$2; shift ;;
    -MF) depfile=$2; shift ;;
    -c) compile_only=1 ;;
    -x) exit 1 ;;  # a precompiled header: refusing it makes tt-metal carry on without one
    -T*) script=${1#-T} ;;
    -Wl,*) IFS=, read -r -a opts <<< "${1#-Wl,}"; ld_options+=("${opts[@]}") ;;
    # the firmware's own start-up object defines _start; every other kernel gets ours
    */wh-iram-start.o | */tmu-crt0.o) start_object=$1 ;;
  esac
  shift
done

if [ "$compile_only" = 1 ]; then
  : > "$output"
  if [ -n "$depfile" ]; then echo "$output:" > "$depfile"; fi
  exit 0
fi

if [ -n "$start_object" ]; then
  objects=("$start_object" "$stubs/kernel_stub.o")
else
  objects=("$stubs/kernel_stub_with_start.o")
fi
exec "$binutils/riscv64-unknown-elf-ld" -m elf32lriscv "${ld_options[@]}" -T "$script" "${objects[@]}" -o "$output"
