"""Rules of the code base that a reader relies on, checked over the source of every library module.

- No module reads another module's private attributes: a name that starts with one underscore
  belongs to the module that defines it; others go through public attributes and methods
  (the optimizer's internals through `opt.placement`, see shardoptim.placement).
- Pure layout math never imports torch.distributed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import shardoptim

PACKAGE = Path(shardoptim.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))


def _defined_names(tree: ast.AST) -> set[str]:
    """Names a module defines: functions, classes, assigned attributes and variables."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _private_reads(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, expression, name) of every `x._name` where x is not self or cls."""
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        out.append((node.lineno, ast.unparse(node), node.attr))
    return out


def test_no_module_reads_another_modules_private_attributes() -> None:
    trees = {path: ast.parse(path.read_text()) for path in MODULES}
    owners: dict[str, set[Path]] = {}
    for path, tree in trees.items():
        for name in _defined_names(tree):
            if name.startswith("_"):
                owners.setdefault(name, set()).add(path)
    offences = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {expr} (defined in "
        f"{', '.join(sorted(str(p.relative_to(PACKAGE.parent)) for p in owners[name]))})"
        for path, tree in trees.items()
        for line, expr, name in _private_reads(tree)
        if name in owners and path not in owners[name]
    ]
    assert not offences, "private attributes read across modules:\n" + "\n".join(offences)


def test_the_rule_sees_a_cross_module_read(tmp_path: Path) -> None:
    """The check above flags `opt._comm` in a module that does not define `_comm` (and not `self._comm`)."""
    owner = ast.parse("class A:\n    def __init__(self):\n        self._comm = 1\n")
    reader = ast.parse("def f(opt):\n    return opt._comm, opt.comm\n")
    assert "_comm" in _defined_names(owner) and "_comm" not in _defined_names(reader)
    assert [expr for _, expr, _ in _private_reads(reader)] == ["opt._comm"]


def test_layout_math_never_imports_torch_distributed() -> None:
    pure = [
        "layout.py",
        "flat_layout.py",
        "tensor_layout.py",
        "tensor_owners.py",
        "segments.py",
        "pieces.py",
        "buffers.py",
        "storage.py",
        "config.py",
        "master.py",
        # pure helpers split out of larger modules (their docstrings say so)
        "lbfgs_line_search.py",
        "checkpoint_format.py",
        "hparam_pack.py",
        "hparam_flow.py",
        "peer_region.py",
        "kept.py",
    ]
    for name in pure:
        tree = ast.parse((PACKAGE / name).read_text())
        imported = [
            alias.name if isinstance(node, ast.Import) else f"{node.module}"
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        ]
        assert not [m for m in imported if m and m.startswith("torch.distributed")], (name, imported)
