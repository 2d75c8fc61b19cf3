"""Train a tiny GPT-2 with a hand-written Accelerate loop on every rank; started by test_frameworks.py.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/integrations/_accelerate_script.py --out DIR --runs sharded,adamw

Runs, in the order given, each writing DIR/{run}_rank{r}.pt (final parameters) and DIR/{run}.json:
- sharded: ShardedOptimizer(AdamW), `register(accelerator)`, 6 steps, `accelerator.save_state()` (the
  defaults: safetensors) into DIR/sharded/ckpt after step 3.
- sharded_resume: a fresh model and optimizer, `accelerator.load_state(DIR/sharded/ckpt)`, steps 4-6.
- adamw: plain torch.optim.AdamW(fused=True), otherwise the same as "sharded".
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from tests.integrations import _common as c


def _checkpoint_info(ckpt: Path) -> dict[str, Any]:
    """Describe an Accelerate checkpoint dir: its files, the tensors in model.safetensors, the optimizer."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
    opt_state = torch.load(ckpt / "optimizer.bin", weights_only=True)
    return {
        "files": sorted(p.name for p in ckpt.iterdir()),
        "model_keys": keys,
        "optimizer_state_entries": len(opt_state["state"]),
        "optimizer_groups": len(opt_state["param_groups"]),
    }


def _train(run: str, out: Path) -> None:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    import shardoptim.integrations.accelerate

    start = time.monotonic()
    accelerator = Accelerator(cpu=True)  # starts the process group: build the optimizer after it
    model = c.tiny_gpt2()
    opt = c.make_optimizer(run, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    data = DataLoader(TensorDataset(c.tokens(c.STEPS * c.BATCH_PER_RANK * 2)), batch_size=c.BATCH_PER_RANK)
    model, opt, data, sched = accelerator.prepare(model, opt, data, sched)
    if run.startswith("sharded"):
        shardoptim.integrations.accelerate.register(accelerator)
    ckpt = out / "sharded" / "ckpt"
    first = 0
    batches = data
    if run == "sharded_resume":
        accelerator.load_state(str(ckpt))
        first = c.SAVE_AT
        batches = accelerator.skip_first_batches(data, c.SAVE_AT)
    model.train()
    for step, (ids,) in enumerate(batches, start=first):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), c.MAX_GRAD_NORM)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step + 1 == c.SAVE_AT and run != "sharded_resume":
            accelerator.save_state(str(out / run / "ckpt"))
    unwrapped = accelerator.unwrap_model(model)
    info: dict[str, Any] = {
        "seconds": time.monotonic() - start,
        "steps": step + 1,
        "state_dict_keys": sorted(unwrapped.state_dict()),
        "world_size": accelerator.num_processes,
        "opt_world_size": getattr(opt.optimizer, "world_size", None),
    }
    if run != "sharded_resume":
        info["checkpoint"] = _checkpoint_info(out / run / "ckpt")
    c.save_result(out, run, unwrapped, **info)
    accelerator.free_memory()


def main() -> None:
    c.hide_broken_torchvision()
    ns = c.parse_args()
    for run in ns.runs.split(","):
        _train(run, ns.out)
        torch.distributed.barrier()
    if c.rank() == 0:
        print(json.dumps({"done": ns.runs}))


if __name__ == "__main__":
    main()
