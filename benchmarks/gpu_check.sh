#!/usr/bin/env bash
# GPU check of the 2:4 activation-sparse FFN op on a bare GPU box (torch + transformers only):
# environment, cuSPARSELt alg-id probe, the GPU tests, then the benchmark at the 130m / 1B / 7B
# FFN shapes with 16k tokens, then 130m training tokens/s dense vs 2:4. Well under 5 minutes on an H100.
# Output is also written to $OUT/ (gpu_check.log, ffn_2to4_gpu.txt) when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."

log() {
    if [[ -n "${OUT:-}" ]]; then
        mkdir -p "$OUT"
        "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
    else
        "$@"
    fi
}

log nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
log python - <<'PY'
import torch
from hf_sparse import kernels
print("torch", torch.__version__, "cuda", torch.version.cuda, "cuSPARSELt", torch.backends.cusparselt.version())
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for dtype in (torch.bfloat16, torch.float16):
    res = kernels.probe_alg_ids("cuda", dtype, max_alg_id=8, shapes=((4096, 3072, 768), (3072, 4096, 768)))
    print(dtype, {alg: ("ok" if ok else "BAD") + f" ({detail})" for alg, (ok, detail) in res.items()})
PY
log timeout 180 python -m pytest -q -m gpu tests/test_sparse_ffn_gpu.py -p no:cacheprovider -rs
bench=(timeout 150 python benchmarks/ffn_2to4.py --device cuda --dtype bf16 --shapes 130m,1b,7b --tokens 16384 --repeats 20)
if [[ -n "${OUT:-}" ]]; then
    "${bench[@]}" 2>&1 | tee "$OUT/ffn_2to4_gpu.txt" | tee -a "$OUT/gpu_check.log"
else
    "${bench[@]}"
fi
# Issue 6: single-GPU training tokens/s of the 130m relu2 model, dense vs the 2:4 recipe (bf16).
log timeout 120 python benchmarks/scaling.py gpu --batch 32 --steps 20
