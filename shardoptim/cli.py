"""Command-line tools: `shardoptim-consolidate DIR OUT.pt` (also `python -m shardoptim.cli DIR OUT.pt`).

Turns a sharded checkpoint directory written by shardoptim.checkpoint.save into one file in the
base optimizer's own format, in this process alone (no process group, no GPU). Imported only by
the console script and by `python -m`; `import shardoptim` never imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

_PROG = "shardoptim-consolidate"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description=(
            "Consolidate a sharded shardoptim checkpoint (from shardoptim.checkpoint.save) into one file "
            "holding the base optimizer's own state_dict format: {'state': {index: {...}}, 'param_groups': "
            "[...]}. A plain torch.optim optimizer on one process loads it with "
            "optimizer.load_state_dict(torch.load(OUT, weights_only=True))."
        ),
    )
    parser.add_argument("checkpoint_dir", metavar="DIR", help="the checkpoint directory passed to save()")
    parser.add_argument("out", metavar="OUT.pt", help="the file to write (replaced atomically)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `shardoptim-consolidate DIR OUT.pt`; return the process exit status.

    Writes OUT.pt through `OUT.pt.partial` and a rename, so a crash leaves no half-written file.

    Args:
        argv: the arguments after the program name; None reads sys.argv[1:].

    Returns:
        0 on success (and for --help), 1 when the checkpoint cannot be read or the file written,
        2 for bad arguments (argparse's convention).
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse exits for --help (0) and for bad arguments (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    # NOTE: imported here so that --help answers without loading torch.
    import torch

    from shardoptim.checkpoint import consolidate_dir

    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")
    try:
        state_dict = consolidate_dir(args.checkpoint_dir)
        torch.save(state_dict, tmp)
        os.replace(tmp, out)
    except (OSError, ValueError) as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {out}: {len(state_dict['state'])} parameters with state, "
        f"{len(state_dict['param_groups'])} param groups"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
