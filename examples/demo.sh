#!/usr/bin/env bash
# The main demo: train examples/train_gpt.py on 2 CPU ranks, print per-rank optimizer memory and
# plot it with the loss to out/loss.png.
#   bash examples/demo.sh [train_gpt.py args...]        e.g. bash examples/demo.sh --steps 300
# Needs only Python 3.10+. If python3 cannot import torch and shardoptim, this creates .venv in the
# repository root and installs torch==2.13.0 first (pinned), then this checkout with matplotlib
# (pip install -e ".[examples]"); later runs reuse .venv. It does not install MPI (tests/run.sh does).
# PYTHON picks the interpreter (default python3), NPROC the ranks (default 2).
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then sed -n '2,8p' "$0"; exit 0; fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
# Whether interpreter $1 imports the modules $2, from / so that the checkout here does not count.
importable() { (cd / && "$1" -c "import $2") >/dev/null 2>&1; }
if ! importable "$python" "torch, shardoptim"; then
  if [[ ! -x .venv/bin/python ]]; then
    echo "demo.sh: $python cannot import torch and shardoptim; creating $repo/.venv" >&2
    "$python" -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
  python="$repo/.venv/bin/python"
  if ! importable "$python" "torch, shardoptim, matplotlib"; then
    # torch first and pinned, so that `pip install -e .` finds it satisfied and never picks another build.
    "$python" -m pip install torch==2.13.0
    "$python" -m pip install -e ".[examples]"
  fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one thread per rank on CPU
exec "$python" -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-2}" examples/train_gpt.py "$@"
