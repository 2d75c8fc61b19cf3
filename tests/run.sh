#!/usr/bin/env bash
# Run the test suite: `bash tests/run.sh` (the README's test command; .ci/run calls it too).
#   bash tests/run.sh                              the whole suite (tests/)
#   bash tests/run.sh tests/unit/test_layout.py    only the given paths (files, dirs, file::test ids)
#   bash tests/run.sh -x -k clip                   pytest options without a path apply to the whole suite
# Uses the first complete environment of: .venv (activated), then python3. Only when neither has
# everything does it make .venv and install torch 2.13.0 (first, pinned), the package with its
# test extras, and MPICH + mpi4py as binary wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the suite imports (module names); keep in step with the `test` extra in pyproject.toml.
modules=(
    shardoptim torch numpy pytest xdist hypothesis mpi4py matplotlib
    transformers accelerate lightning safetensors
    pytorch_optimizer schedulefree prodigyopt dadaptation lion_pytorch
)

# Whether interpreter $1 has every module, judged from / so the checkout itself does not count as
# installed. find_spec looks the modules up without importing them (fast, no side effects).
complete() {
    (cd / && "$1" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' \
        "${modules[@]}") >/dev/null 2>&1
}

if [ -x .venv/bin/python ] && complete .venv/bin/python; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
elif ! complete python3; then
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
    python -m pip install -q torch==2.13.0
    python -m pip install -q -e ".[test]"
    python -m pip install -q --only-binary=:all: mpi4py mpich
fi

# Run tests/ unless a path was given: an argument that names an existing file or directory
# (before any ::test id). Option values such as `-k clip` are not paths and keep tests/.
targets=(tests)
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
        targets=()
        break
    fi
done

export OMP_NUM_THREADS=1
python3 -m pytest -n 2 -q -p no:cacheprovider ${targets[@]+"${targets[@]}"} "$@"
