"""Train a tiny GPT-2 with Hugging Face Trainer on every rank; started by test_frameworks.py.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/integrations/_trainer_script.py --out DIR --runs sharded,adamw

Runs, in the order given, each writing DIR/{run}_rank{r}.pt (final parameters) and DIR/{run}.json:
- sharded: ShardedOptimizer(AdamW) + ShardedOptimizerCallback, 6 steps, Trainer saves checkpoint-3.
- sharded_resume: a fresh model, resumed from DIR/sharded/checkpoint-3 up to step 6; Trainer builds
  the ShardedOptimizer itself this time (`optimizer_cls_and_kwargs`), with the same two groups.
- adamw: plain torch.optim.AdamW(fused=True), otherwise the same as "sharded".
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import shardoptim
from tests.integrations import _common as c


def _dataset() -> list[dict[str, torch.Tensor]]:
    ids = c.tokens(c.STEPS * c.BATCH_PER_RANK * 2)
    return [{"input_ids": row, "labels": row} for row in ids]


def _checkpoint_info(ckpt: Path) -> dict[str, Any]:
    """Describe a Trainer checkpoint dir: the tensors in model.safetensors and the optimizer's state."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
    opt_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    return {
        "model_keys": keys,
        "optimizer_state_entries": len(opt_state["state"]),
        "optimizer_groups": len(opt_state["param_groups"]),
    }


def _train(run: str, out: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from shardoptim.integrations.transformers import ShardedOptimizerCallback

    start = time.monotonic()
    # NOTE: TrainingArguments starts the process group (accelerate's PartialState); the optimizer
    # must be built after it to see both ranks.
    args = TrainingArguments(
        output_dir=str(out / run),
        per_device_train_batch_size=c.BATCH_PER_RANK,
        max_steps=c.STEPS,
        save_strategy="steps",
        save_steps=c.SAVE_AT,
        max_grad_norm=c.MAX_GRAD_NORM,
        weight_decay=c.WEIGHT_DECAY,  # used by the groups Trainer makes in "sharded_resume"
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=c.SEED,
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
    )
    model = c.tiny_gpt2()
    callbacks = [ShardedOptimizerCallback()] if run.startswith("sharded") else []
    if run == "sharded_resume":
        # Trainer builds the optimizer itself (after placing the model), with its decay groups.
        opt_kwargs = {"optimizer_class": torch.optim.AdamW, "lr": c.LR}
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_dataset(),
            optimizer_cls_and_kwargs=(shardoptim.ShardedOptimizer, opt_kwargs),
            callbacks=callbacks,
        )
        trainer.train(resume_from_checkpoint=str(out / "sharded" / f"checkpoint-{c.SAVE_AT}"))
    else:
        opt = c.make_optimizer(run, model)  # built before Trainer: Trainer moves the model later
        trainer = Trainer(
            model=model, args=args, train_dataset=_dataset(), optimizers=(opt, None), callbacks=callbacks
        )
        trainer.train()
    info: dict[str, Any] = {
        "seconds": time.monotonic() - start,
        "state_dict_keys": sorted(trainer.model.state_dict()),
        "world_size": torch.distributed.get_world_size(),
        "opt_world_size": getattr(trainer.optimizer.optimizer, "world_size", None),
    }
    if run != "sharded_resume":
        info["checkpoint"] = _checkpoint_info(out / run / f"checkpoint-{c.SAVE_AT}")
    c.save_result(out, run, trainer.model, **info)


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
