#!/usr/bin/env bash
# Run a command as if this machine's CPU had AVX2 but no AVX-512 (issue 18), on an AVX-512 machine:
#
#   tools/emulate_avx2.sh .venv/bin/python -m pytest -q tests/plugins
#
# - the command runs under qemu-user's emulated Haswell (AVX2, FMA, F16C; no AVX-512): cpuid says so to
#   torch, oneDNN and Inductor, and an AVX-512 instruction anywhere is an illegal instruction (SIGILL);
# - /proc/cpuinfo shows this CPU's flags without the AVX-512 ones (a private mount namespace), which
#   llmbuild reads for targets and skip reasons;
# - the C++ compiler driver runs under the same emulation, so `-march=native` means Haswell for the op
#   library and for Inductor's code (the driver resolves `native` from cpuid; the compiler proper runs
#   natively, so builds stay fast).
# Needs root (unshare, mount) and qemu-user (apt-get install qemu-user). Emulation is ~10-50x slower than
# the machine: meant for the op tests and a few engine runs, not for timing anything. Processes the command
# starts run natively (qemu-user follows no exec), except the compiler driver.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
command -v qemu-x86_64 >/dev/null || { echo "error: qemu-x86_64 not found (apt-get install qemu-user)" >&2; exit 2; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
awk '/^flags/ { out = ""; for (i = 1; i <= NF; i++) if ($i !~ /^avx512|^avx_vnni$|^amx/) out = out " " $i; print substr(out, 2); next } { print }' \
  /proc/cpuinfo > "$work/cpuinfo"
cat > "$work/c++" <<EOF
#!/bin/sh
exec qemu-x86_64 -cpu Haswell $(command -v g++) "\$@"
EOF
chmod +x "$work/c++"

# a private op-library and Inductor cache: libraries built for the real CPU must not be picked up
export CXX="$work/c++" LLMBUILD_CACHE_DIR="${LLMBUILD_CACHE_DIR:-$work/cache}" TORCHINDUCTOR_CACHE_DIR="$work/inductor"
unshare --mount sh -c 'mount --bind "$0" /proc/cpuinfo && exec qemu-x86_64 -cpu Haswell "$@"' "$work/cpuinfo" "$@"
