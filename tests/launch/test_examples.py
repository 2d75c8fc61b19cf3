"""Run the examples as a user would: under torchrun with 2 CPU ranks, and resumed on 1 process.

Each case starts real processes (5-20 s on 2 cores). Every wait has a timeout, after which the whole
process group of the command is killed and the test fails with the output seen so far.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from tests._subproc import child_env, run_logged

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TIMEOUT_S = 120.0
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
#: A row of train_gpt.py's memory table: rank, sharded MiB, unsharded MiB, ratio.
_MEMORY_ROW = re.compile(r"^\s*(\d+)\s+([\d.]+) MiB\s+([\d.]+) MiB\s+([\d.]+)\s*$", re.MULTILINE)
_LOSS = re.compile(r"^loss: first ([\d.]+) -> final ([\d.]+)$", re.MULTILINE)


def _env() -> dict[str, str]:
    return child_env()


def _run(cmd: list[str], tmp_path: Path) -> str:
    """Run `cmd` from the repository root; return its output, or fail the test with it."""
    code, output = run_logged(cmd, log=tmp_path / "output.log", timeout_s=TIMEOUT_S, env=_env())
    if code != 0:
        pytest.fail(f"{shlex.join(cmd)} exited with {code}:\n{output}")
    return output


def _check_png(path: Path) -> tuple[int, int]:
    """Parse a PNG's chunks (CRCs included) and decompress its pixels; return (width, height)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} has no PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body), f"bad CRC in the {tag!r} chunk of {path}"
        chunks.append((tag, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and len(chunks[0][1]) == 13 and chunks[-1][0] == b"IEND", chunks
    width, height, depth, color_type, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert width > 0 and height > 0 and (depth, color_type) == (8, 2), (width, height, depth, color_type)
    pixels = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    assert len(pixels) == height * (1 + 3 * width)
    return width, height


def _memory_rows(output: str) -> list[tuple[int, float, float, float]]:
    return [(int(r), float(s), float(u), float(q)) for r, s, u, q in _MEMORY_ROW.findall(output)]


def _losses(output: str) -> tuple[float, float]:
    found = _LOSS.findall(output)
    assert len(found) == 1, output
    return float(found[0][0]), float(found[0][1])


def test_train_gpt_two_ranks_then_resume_on_one(tmp_path: Path) -> None:
    ckpt, png = tmp_path / "ckpt" / "gpt.pt", tmp_path / "loss.png"
    paths = ["--out", str(ckpt), "--plot", str(png), "--log-every", "5"]
    # 2 ranks: the first 20 of 30 steps.
    output = _run(
        [*TORCHRUN, str(EXAMPLES / "train_gpt.py"), "--steps", "30", "--stop-after", "20", *paths], tmp_path
    )
    assert "train_gpt: 2 rank(s) (torchrun, gloo)" in output, output
    assert "optimizer state per rank" in output, output
    rows = _memory_rows(output)
    assert [r for r, *_ in rows] == [0, 1], output
    for _, sharded, unsharded, ratio in rows:  # each rank holds about half of AdamW's state
        assert 0.45 < ratio < 0.55 and sharded < unsharded, output
    first, final = _losses(output)
    assert final < first - 0.5, output
    assert _check_png(png) == (640, 400)
    saved = torch.load(ckpt, weights_only=True)
    assert {"model", "optimizer", "scheduler", "step"} <= saved.keys() and saved["step"] == 20
    assert len(saved["optimizer"]["state"]) == len(saved["optimizer"]["param_groups"][0]["params"])
    assert not list(ckpt.parent.glob("*.tmp")), "the temporary checkpoint file was left behind"

    # 1 process: load the 2-rank checkpoint and run the remaining 10 steps.
    png.unlink()
    output = _run([sys.executable, str(EXAMPLES / "train_gpt.py"), "--resume", *paths], tmp_path)
    assert "train_gpt: 1 rank(s) (single, gloo)" in output and "steps 20 -> 30 of 30 (resumed" in output, (
        output
    )
    assert [(r, ratio) for r, _, _, ratio in _memory_rows(output)] == [(0, 1.0)], output
    resumed_first, resumed_final = _losses(output)
    assert resumed_first == first and resumed_final < first - 0.5, output  # the curve keeps its history
    assert _check_png(png) == (640, 400)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 30 and len(saved["losses"]) == 30


def test_train_gpt_stage2_bf16_then_resume_on_one(tmp_path: Path) -> None:
    ckpt, png = tmp_path / "gpt.pt", tmp_path / "loss.png"
    paths = ["--out", str(ckpt), "--plot", str(png), "--log-every", "5", "--stage", "2", "--bf16"]
    output = _run(
        [*TORCHRUN, str(EXAMPLES / "train_gpt.py"), "--steps", "30", "--stop-after", "20", *paths], tmp_path
    )
    assert "ZeRO stage 2, bf16 + fp32 master weights" in output, output
    for _, sharded, unsharded, ratio in _memory_rows(output):  # half of fp32 moments + fp32 masters
        assert 0.45 < ratio < 0.55 and sharded < unsharded, output
    first, final = _losses(output)
    assert final < first - 0.5, output
    saved = torch.load(ckpt, weights_only=True)
    assert next(iter(saved["model"].values())).dtype == torch.bfloat16
    assert all(entry["master_param"].dtype == torch.float32 for entry in saved["optimizer"]["state"].values())
    output = _run([sys.executable, str(EXAMPLES / "train_gpt.py"), "--resume", *paths], tmp_path)
    assert "steps 20 -> 30 of 30 (resumed" in output, output
    assert _losses(output)[1] < first - 0.5, output


def test_finetune_param_groups_two_ranks(tmp_path: Path) -> None:
    args = ["--steps", "60", "--freeze-steps", "20", "--warmup", "10", "--log-every", "20"]
    output = _run([*TORCHRUN, str(EXAMPLES / "finetune_param_groups.py"), *args], tmp_path)
    names = ["backbone", "backbone.no_decay", "head", "head.no_decay"]
    for name in names:
        assert re.search(rf"group {re.escape(name)} ", output), output
    header = next(line.split() for line in output.splitlines() if line.split()[:1] == ["step"])
    assert header == ["step", *names, "loss", "val", "acc"], output
    step_to_lrs = {
        int(parts[0]): [float(x) for x in parts[1:5]]
        for parts in (line.split() for line in output.splitlines())
        if len(parts) >= 6 and parts[0].isdigit()
    }
    assert sorted(step_to_lrs) == [0, 20, 40, 60], output
    assert step_to_lrs[20][:2] == [0.0, 0.0], output  # backbone still frozen
    assert 0.0 < step_to_lrs[40][0] < step_to_lrs[40][2], output  # unfrozen, below the head's lr
    assert all(lrs[0] == lrs[1] and lrs[2] == lrs[3] for lrs in step_to_lrs.values()), output
    found = re.search(r"^val accuracy: ([\d.]+) -> ([\d.]+)", output, re.MULTILINE)
    assert found and float(found[2]) > float(found[1]) + 0.2, output


def test_lbfgs_fit_two_ranks(tmp_path: Path) -> None:
    output = _run([*TORCHRUN, str(EXAMPLES / "lbfgs_fit.py")], tmp_path)
    assert "2 rank(s), 8,224 float64 parameters" in output, output
    rank_to_nbytes = [
        int(n.replace(",", "")) for n in re.findall(r"^rank \d state \(sharded\):\s+([\d,]+) B", output, re.M)
    ]
    reference = re.search(r"^torch\.optim\.LBFGS state \(one process\):\s+([\d,]+) B", output, re.MULTILINE)
    assert len(rank_to_nbytes) == 2 and reference, output
    assert max(rank_to_nbytes) < int(reference[1].replace(",", "")), output  # each rank holds a part
    found = re.search(r"^final loss: sharded ([\d.]+)\s+torch\.optim\.LBFGS ([\d.]+)", output, re.MULTILINE)
    assert found and abs(float(found[1]) - float(found[2])) < 1e-6, output


def test_muon_adamw_two_ranks(tmp_path: Path) -> None:
    output = _run([*TORCHRUN, str(EXAMPLES / "muon_adamw.py"), "--steps", "10", "--log-every", "5"], tmp_path)
    assert "2 rank(s); Muon sharding=tensor, AdamW sharding=flat" in output, output
    losses = [float(x) for x in re.findall(r"^step\s+\d+\s+loss ([\d.]+)$", output, re.MULTILINE)]
    assert len(losses) == 3 and losses[-1] < losses[0], output
    for rank in (0, 1):
        assert re.search(rf"^rank {rank}: optimizer state  Muon [\d,]+ B  AdamW [\d,]+ B$", output, re.M), (
            output
        )


def test_hybrid_sharding_two_nodes_of_two(tmp_path: Path) -> None:
    """Two torchrun agents, one per emulated node (LOCAL_WORLD_SIZE=2 each), as on a 2-node cluster."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2"]
    node += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    script = str(EXAMPLES / "hybrid_sharding.py")
    log1 = tmp_path / "node1.log"
    with log1.open("w") as out:
        other = subprocess.Popen(
            [*node, "--node-rank", "1", script], env=_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            output = _run([*node, "--node-rank", "0", script], tmp_path)
            other.wait(timeout=TIMEOUT_S)
        finally:
            if other.poll() is None:
                os.killpg(other.pid, signal.SIGKILL)
                other.wait()
    assert other.returncode == 0, log1.read_text()
    assert "4 ranks: shard groups of 2 x 2 replicas, stage 2" in output, output
    fractions = [float(f) for f in re.findall(r"^rank \d optimizer state [\d,]+ B \(([\d.]+) of unsharded", output, re.M)]
    assert len(fractions) == 4 and all(0.49 <= f <= 0.51 for f in fractions), output
    found = re.search(r"^max \|sharded - DDP \+ AdamW\| over the weights: (\S+)$", output, re.MULTILINE)
    assert found and float(found[1]) < 1e-5, output
    assert "verify_replicas: every rank holds the same weights" in output, output
