"""Sharded checkpoints through torch.distributed.checkpoint: parallel, atomic, any world size.

The public face: `save` (shardoptim.checkpoint_save: each rank writes only the state it owns, in
parallel, and the directory appears atomically), `load` (shardoptim.checkpoint_load: each rank
reads only the chunks that overlap its pieces, at any world size and under either layout), and
the offline consolidation kept here: `consolidate_dir` turns a checkpoint directory into the base
optimizer's own single-file format in one process, without any process group
(`shardoptim-consolidate DIR OUT.pt`, shardoptim.cli; also `python -m shardoptim.checkpoint
consolidate DIR OUT.pt`). Nothing is unpickled with `weights_only=False`.

Must not import shardoptim.optimizer at run time. `import shardoptim` does not import this module
(it is loaded on first use), so that `python -m shardoptim.checkpoint` runs it fresh.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from shardoptim.buffers import from_flat
from shardoptim.checkpoint_format import saved_memory_order, state_key
from shardoptim.checkpoint_load import load, read_meta, read_tensors, resolve
from shardoptim.checkpoint_save import save

__all__ = ["consolidate_dir", "load", "save"]


def consolidate_dir(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a sharded checkpoint in this process and return the base optimizer's format.

    No process group is needed. State tensors are full-shape, keyed by parameter index.
    """
    where = resolve(path)
    meta, tensors = read_meta(where)
    loaded = read_tensors(where, {k: v for k, v in tensors.items() if k.startswith("optim.state/")})
    state: dict[int, dict[str, Any]] = {}
    for index, (name, shape) in enumerate(zip(meta["names"], meta["shapes"])):
        entry: dict[str, Any] = {}
        for key, spec in meta["chunks"].get(name, {}).items():
            if spec == "whole":
                entry[key] = loaded[state_key(name, key)]
            elif isinstance(spec, list):
                parts = sorted(spec)
                full = torch.cat([loaded[state_key(name, key, start)] for start, _ in parts])
                entry[key] = from_flat(full, shape, saved_memory_order(meta, name))
            else:
                entry[key] = spec[1]
        if entry:
            state[index] = entry
    name_to_index = {name: i for i, name in enumerate(meta["names"])}
    groups = [{**g, "params": [name_to_index[n] for n in g["params"]]} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _main(argv: list[str]) -> int:
    """Serve the older `python -m shardoptim.checkpoint consolidate DIR OUT.pt` through shardoptim.cli."""
    from shardoptim.cli import main

    return main(argv[1:] if argv[:1] == ["consolidate"] else argv)


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
