"""Shared pieces of the framework scripts: a tiny GPT-2, synthetic tokens, optimizers, result files.

Imported by the `_*_script.py` files that tests/integrations/test_frameworks.py starts under torchrun,
and by the single-process tests. Imports transformers only inside functions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

SEED = 1234
VOCAB = 128
SEQ_LEN = 16
BATCH_PER_RANK = 2
STEPS = 6
SAVE_AT = 3
LR = 1e-3
WEIGHT_DECAY = 0.1
MAX_GRAD_NORM = 1.0


def hide_broken_torchvision() -> None:
    """Make a torchvision that cannot be imported look absent, before transformers or lightning load.

    NOTE: some machines carry a torchvision wheel built for another torch (a CUDA build next to a CPU
    torch: "operator torchvision::nms does not exist" at import). transformers' image utilities and
    torchmetrics (imported by lightning) import torchvision whenever its metadata says it is
    installed, so every import of theirs fails. Neither package needs it here.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure: treat as absent
        pass
    else:
        return
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision"] = None  # type: ignore[assignment]  # import -> ImportError, find_spec -> None
    try:
        from lightning_utilities.core import imports
    except ImportError:
        return
    check = imports.RequirementCache._check_requirement

    def check_requirement(self: Any) -> None:
        name = (self.requirement or "").split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
        if name == "torchvision":
            self.available = False
            self.message = "torchvision is installed but cannot be imported; treated as absent"
            return
        check(self)

    imports.RequirementCache._check_requirement = check_requirement


def parse_args() -> argparse.Namespace:
    """Parse `--out DIR --runs NAME[,NAME...]` (run names: sharded, sharded_resume, adamw)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--runs", required=True, help="comma-separated: sharded, sharded_resume, adamw")
    return parser.parse_args()


def tiny_gpt2() -> Any:
    """Return a seeded 2-layer GPT-2 (tied embeddings) with every dropout off, so runs are deterministic."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(SEED)
    return GPT2LMHeadModel(config)


def tokens(num_samples: int) -> torch.Tensor:
    """Return (num_samples, SEQ_LEN) random token ids, the same in every process."""
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, VOCAB, (num_samples, SEQ_LEN), generator=gen)


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Split the trainable parameters as Trainer does: matrices decay, biases and norms do not."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]


def make_optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Build AdamW over `model`: sharded ("sharded...") or plain fused torch.optim.AdamW ("adamw")."""
    if kind.startswith("sharded"):
        import shardoptim

        return shardoptim.ShardedOptimizer(param_groups(model), torch.optim.AdamW, lr=LR)
    return torch.optim.AdamW(param_groups(model), lr=LR, fused=True)


def rank() -> int:
    """This process's global rank under torchrun (0 without it)."""
    return int(os.environ.get("RANK", "0"))


def save_result(out: Path, run: str, model: torch.nn.Module, **info: Any) -> None:
    """Write this rank's final parameters (`{run}_rank{r}.pt`) and, on rank 0, `{run}.json` with info.

    `model` is the unwrapped GPT-2 (tiny_gpt2's parameter names); info gains "max_change_from_init".
    """
    out.mkdir(parents=True, exist_ok=True)
    params = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
    torch.save(params, out / f"{run}_rank{rank()}.pt")
    initial = dict(tiny_gpt2().named_parameters())
    info["max_change_from_init"] = max((params[n] - initial[n]).abs().max().item() for n in params)
    if rank() == 0:
        (out / f"{run}.json").write_text(json.dumps(info, indent=1, sort_keys=True))
