"""Train a tiny GPT-2 with Lightning's DDP strategy on every rank; started by test_frameworks.py.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/integrations/_lightning_script.py --out DIR --runs sharded,adamw

No shardoptim integration is used: `configure_optimizers` returns the ShardedOptimizer, and
Lightning's own checkpointing does the rest. Runs, in the order given, each writing
DIR/{run}_rank{r}.pt (final parameters) and DIR/{run}.json:
- sharded: ShardedOptimizer(AdamW), 2 epochs of 3 steps; ModelCheckpoint saves DIR/sharded/step=3.ckpt.
- sharded_resume: a fresh module, `trainer.fit(..., ckpt_path=DIR/sharded/step=3.ckpt)`, up to step 6.
- adamw: plain torch.optim.AdamW(fused=True), otherwise the same as "sharded".

Checkpoints are taken at an epoch boundary: Lightning cannot resume a plain DataLoader mid-epoch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from tests.integrations import _common as c

STEPS_PER_EPOCH = c.SAVE_AT


def _module(kind: str) -> Any:
    import lightning.pytorch as pl

    class GPT2Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = c.tiny_gpt2()

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            (ids,) = batch
            loss: torch.Tensor = self.model(input_ids=ids, labels=ids).loss
            return loss

        def configure_optimizers(self) -> dict[str, Any]:
            opt = c.make_optimizer(kind, self.model)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return GPT2Module()


def _checkpoint_info(ckpt: Path) -> dict[str, Any]:
    """Describe a Lightning checkpoint: the model's tensors and the optimizer's state."""
    saved = torch.load(ckpt, weights_only=False)  # our own file; Lightning stores loop state objects too
    (opt_state,) = saved["optimizer_states"]
    return {
        "model_keys": sorted(saved["state_dict"]),
        "optimizer_state_entries": len(opt_state["state"]),
        "optimizer_groups": len(opt_state["param_groups"]),
        "global_step": saved["global_step"],
    }


def _train(run: str, out: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    start = time.monotonic()
    module = _module(run)
    data = DataLoader(
        TensorDataset(c.tokens(STEPS_PER_EPOCH * c.BATCH_PER_RANK * 2)), batch_size=c.BATCH_PER_RANK
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=c.STEPS,
        gradient_clip_val=c.MAX_GRAD_NORM,
        callbacks=[
            ModelCheckpoint(
                dirpath=out / run, filename="{step}", every_n_train_steps=c.SAVE_AT, save_top_k=-1
            )
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    ckpt = out / "sharded" / f"step={c.SAVE_AT}.ckpt"
    trainer.fit(module, train_dataloaders=data, ckpt_path=str(ckpt) if run == "sharded_resume" else None)
    opt = trainer.optimizers[0]
    info: dict[str, Any] = {
        "seconds": time.monotonic() - start,
        "steps": trainer.global_step,
        "state_dict_keys": sorted(module.state_dict()),
        "world_size": trainer.world_size,
        "opt_world_size": getattr(opt, "world_size", None),
        "opt_class": type(opt).__name__,
    }
    if run != "sharded_resume":
        info["checkpoint"] = _checkpoint_info(out / run / f"step={c.SAVE_AT}.ckpt")
    c.save_result(out, run, module.model, **info)


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
