#!/usr/bin/env bash
# Start NPROC processes per node with torchrun; the script calls shardoptim.init_distributed().
#   Single node:  launch/torchrun.sh NPROC script.py [args...]
#   Multi-node:   NNODES=2 NODE_RANK=<0..NNODES-1> MASTER_ADDR=<host of node 0> MASTER_PORT=29500 \
#                 launch/torchrun.sh NPROC script.py [args...]   (on every node; c10d rendezvous,
#                 node 0 hosts it at MASTER_ADDR:MASTER_PORT; RDZV_ID names the job, default shardoptim)
set -euo pipefail
if [[ $# -lt 2 ]]; then sed -n '2,6p' "$0" >&2; exit 2; fi
nproc="$1"; shift
if [[ "${NNODES:-1}" -gt 1 ]]; then
  : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on every node}" "${MASTER_ADDR:?set MASTER_ADDR to node 0}"
  : "${MASTER_PORT:?set MASTER_PORT to a free port on node 0}"
  is_host=$([[ "$NODE_RANK" == 0 ]] && echo 1 || echo 0)
  exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$nproc" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-shardoptim}" \
    --rdzv-conf "is_host=$is_host" "$@"
fi
exec torchrun --standalone --nproc-per-node "$nproc" "$@"
