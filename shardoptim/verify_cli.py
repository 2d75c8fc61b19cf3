"""`shardoptim-verify`: check an optimizer class on your own model before a long run (shardoptim.verify).

    shardoptim-verify timm.optim:SGDP --model mymodels:build --loss mymodels:loss \\
        --opt lr=0.01 --opt momentum=0.9 --steps 5 --world-size 2 --sharding auto

Spawns CPU ranks (gloo), runs the sharded optimizer against the plain class with the same
gradients, prints per parameter the worst difference, the layout used and a verdict, then the
layout it recommends. Exit status: 0 when the requested sharding is exact or within tolerance,
1 when it differs or is refused, 2 on a usage error. Imported only by the console script and by
`python -m shardoptim.verify_cli`.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence
from typing import Any

_PROG = "shardoptim-verify"


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE (e.g. lr=0.01 or betas=(0.9,0.99)), got {text!r}"
        )
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word: a string option


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description=(
            "Run an optimizer class sharded by shardoptim at several CPU ranks against the plain class on your "
            "model, with the same gradients, and report per parameter whether the result is exact."
        ),
    )
    parser.add_argument("optimizer", metavar="MODULE:CLASS", help="the optimizer class, e.g. timm.optim:SGDP")
    parser.add_argument("--model", required=True, metavar="MODULE:FN", help="function returning the model")
    parser.add_argument(
        "--loss",
        required=True,
        metavar="MODULE:FN",
        help="function loss(model) -> scalar tensor for one step",
    )
    parser.add_argument(
        "--opt",
        action="append",
        default=[],
        type=_option,
        metavar="KEY=VALUE",
        help="an optimizer option (Python literal), repeatable: --opt lr=0.01 --opt betas=(0.9,0.99)",
    )
    parser.add_argument("--steps", type=int, default=5, help="steps to compare (default 5)")
    parser.add_argument("--world-size", type=int, default=2, help="CPU ranks to shard over (default 2)")
    parser.add_argument(
        "--sharding", default="auto", choices=("auto", "flat", "tensor", "replicated"), help="layout to check"
    )
    parser.add_argument("--rtol", type=float, default=1e-6, help="relative difference still within tolerance")
    parser.add_argument("--closure", action="store_true", help="evaluate the loss in a closure on each copy")
    parser.add_argument("--seed", type=int, default=0, help="torch seed before building each model copy")
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout in seconds")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `shardoptim-verify`; return the process exit status.

    Args:
        argv: the arguments after the program name; None reads sys.argv[1:].
    """
    args = _parser().parse_args(argv)
    from shardoptim.verify import verify

    try:
        result = verify(
            args.optimizer,
            args.model,
            args.loss,
            steps=args.steps,
            world_size=args.world_size,
            sharding=args.sharding,
            rtol=args.rtol,
            closure=True if args.closure else None,
            seed=args.seed,
            timeout_s=args.timeout,
            **dict(args.opt),
        )
    except (ValueError, ImportError, AttributeError) as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.report())
    return 0 if result.verdict in ("exact", "within tolerance") else 1


if __name__ == "__main__":
    sys.exit(main())
