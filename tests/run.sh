#!/usr/bin/env bash
# Run the whole test suite: `bash tests/run.sh` (the README's test command; .ci/run calls it too).
# On a fresh machine with only Python 3 it first makes .venv and installs torch 2.13.0 (CPU),
# the package with its test extras, and MPICH + mpi4py as binary wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import shardoptim, torch, pytest, xdist, hypothesis, mpi4py" 2>/dev/null; then
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
    python -m pip install -q torch==2.13.0
    python -m pip install -q -e ".[test]"
    python -m pip install -q --only-binary=:all: mpi4py mpich
fi
export OMP_NUM_THREADS=1
python3 -m pytest -n 2 -q -p no:cacheprovider tests "$@"
