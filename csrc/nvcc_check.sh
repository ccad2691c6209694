#!/usr/bin/env bash
# Compile-checks every CUDA source of kdlib._C with plain nvcc (no torch headers needed), for
# sm_80 (A100) and sm_90 (H100/H200). CI runs it on machines with nvcc but no GPU.
# Usage: csrc/nvcc_check.sh   (NVCC=/path/to/nvcc to pick a compiler)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-nvcc}"
out="$(mktemp -d /tmp/kdlib-nvcc-check.XXXXXX)"
trap 'rm -rf "$out"' EXIT

command -v "$nvcc" >/dev/null || { echo "nvcc_check: $nvcc not found" >&2; exit 2; }
shopt -s nullglob
sources=("$here"/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "nvcc_check: no .cu files under $here/cuda" >&2
  exit 2
fi

"$nvcc" --version | tail -n 1
status=0
for src in "${sources[@]}"; do
  for arch in 80 90; do
    obj="$out/$(basename "$src" .cu).sm_$arch.o"
    if "$nvcc" -c "$src" -o "$obj" -I"$here" -std=c++17 -O3 -Werror all-warnings \
        -gencode "arch=compute_$arch,code=sm_$arch"; then
      echo "ok      ${src#"$here"/} sm_$arch"
    else
      echo "FAILED  ${src#"$here"/} sm_$arch" >&2
      status=1
    fi
  done
done
exit $status
