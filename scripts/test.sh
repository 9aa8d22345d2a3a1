#!/usr/bin/env bash
# Quick start 2: set everything up (Python env, headless Chromium), then run every test,
# then the numerically sensitive ones (marker `numerics`) again under other CPU kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install-chromium.sh
.venv/bin/ruff check src tests examples bench
.venv/bin/python -m pytest -n 2 -q "$@"
# Another machine rounds floats differently: another vector width splits every sum and
# every elementwise kernel otherwise, and another BLAS code path every matrix product.
# Let this machine stand in for others: torch's kernels forced to scalar code, then to
# AVX2 (8 lanes where AVX-512 uses 16) with MKL on its SSE2-compatible path (MKL on
# AMD ignores MKL_ENABLE_INSTRUCTIONS; MKL_CBWR=COMPATIBLE does change its sgemm). The
# `numerics` tests (tolerances derived from float32's error, the demo's claims) must
# hold under each. Extra arguments go to the main run only.
for kernels in "ATEN_CPU_CAPABILITY=default" "ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE"; do
    echo "== numerics under $kernels"
    env $kernels .venv/bin/python -m pytest -n 2 -q -m numerics
done
