#!/usr/bin/env bash
# Every GPU check of shardoptim, in one line, from the repository root: bash tests/gpu/run_all.sh
#
# 1 GPU:  pytest tests/gpu (world size 1, and one rank of 4 on torch's fake group with real CUDA
#         tensors) and the CUDA step benchmark (benchmarks/scale_sim.py --device cuda, GPT-2 small).
# 2+ GPUs: also tests/gpu/_nccl_checks.py under torchrun, one rank per GPU, for the backends
#         "nccl", "cpu:gloo,cuda:nccl" and init_process_group() without one ("default").
# Exit status non-zero on the first failure. Written without a GPU (issue 23): never run yet.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then
    echo "no CUDA device is visible; these checks need one" >&2
    exit 1
fi
echo "== $gpus GPU(s): $(python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0), "NCCL", torch.cuda.nccl.version())')"
python3 -m pytest -q -p no:cacheprovider tests/gpu
python3 benchmarks/scale_sim.py --device cuda --models gpt2-small --ranks 8,64
if [ "$gpus" -ge 2 ]; then
    for backend in nccl "cpu:gloo,cuda:nccl" default; do
        echo "== NCCL checks, $gpus ranks, backend $backend"
        timeout 900 torchrun --standalone --nproc-per-node "$gpus" tests/gpu/_nccl_checks.py --backend "$backend"
    done
fi
echo "== all GPU checks passed"
