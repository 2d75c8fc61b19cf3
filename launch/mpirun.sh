#!/usr/bin/env bash
# Start NPROC processes with mpirun/mpiexec (MPICH, Intel MPI, Open MPI, MVAPICH2); needs mpi4py.
#   launch/mpirun.sh NPROC script.py [args...]
#   MPIEXEC=/path/to/mpiexec picks the launcher (use the MPI that mpi4py was built with); PYTHON picks python.
#   Quick install: pip install --only-binary=:all: mpi4py mpich
set -euo pipefail
if [[ $# -lt 2 ]]; then sed -n '2,5p' "$0" >&2; exit 2; fi
nproc="$1"; shift
mpiexec="${MPIEXEC:-$(command -v mpirun || command -v mpiexec || true)}"
[[ -n "$mpiexec" ]] || { echo "mpirun.sh: no mpirun/mpiexec on PATH; pip install --only-binary=:all: mpi4py mpich" >&2; exit 127; }
flags=()
# Only Open MPI refuses root and more ranks than cores; MPICH's hydra rejects these flags.
if "$mpiexec" --version 2>&1 | grep -q "Open MPI"; then flags=(--allow-run-as-root --oversubscribe); fi
exec "$mpiexec" ${flags[@]+"${flags[@]}"} -n "$nproc" "${PYTHON:-python}" "$@"
