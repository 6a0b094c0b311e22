#!/bin/bash
# Run a command as on an x86 host with AVX2 and without AVX-512 or AMX (the AMD EPYC hosts of
# sessions 43-46), on a host that has them:
#   - the CPU flags that cryo2d reads (/proc/cpuinfo) without avx512*, amx* and avx_vnni, so the
#     engine picks the coarse product such a host gets (int8, cryo2d.em.estep.coarse_dtype_for);
#   - MKL (float32 products), oneDNN (int8 products), ATen's vector code and Numba's kernels held
#     to AVX2, so they run the instructions such a host has (oneDNN's int8 product then multiplies
#     bytes in 16-bit pairs as AVX2 does, without VNNI).
# Needs root (a private mount namespace hides the flags from this command only).
#   bash benchmarks/as_avx2.sh python -m cryo2d classify particles.star -o job --classes 20
#   bash benchmarks/as_avx2.sh python benchmarks/estep.py
set -euo pipefail
flags=$(mktemp)
trap 'rm -f "$flags"' EXIT
sed 's/ avx512[a-z0-9_]*//g; s/ amx[a-z0-9_]*//g; s/ avx_vnni//g' /proc/cpuinfo > "$flags"
export MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 NUMBA_CPU_NAME=haswell
unshare -m bash -c 'mount --bind "$0" /proc/cpuinfo && exec "$@"' "$flags" "$@"
