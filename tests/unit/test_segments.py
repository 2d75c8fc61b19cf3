"""Segments: a flat bucket held in separate tensors, read and written by bucket offset."""

from __future__ import annotations

import pytest
import torch

from shardoptim.segments import Segments


def _bucket() -> tuple[Segments, list[torch.Tensor]]:
    parts = [torch.arange(0.0, 5.0), torch.arange(10.0, 13.0), torch.arange(20.0, 24.0)]
    return Segments([(0, parts[0]), (8, parts[1]), (16, parts[2])], 24), parts


def test_read_skips_padding_and_write_drops_it() -> None:
    segments, parts = _bucket()
    out = torch.full((24,), -1.0)
    segments.read_(0, 24, out)
    expected = torch.full((24,), -1.0)
    expected[0:5], expected[8:11], expected[16:20] = parts[0], parts[1], parts[2]
    assert torch.equal(out, expected)
    # a range that starts in padding and cuts two segments
    window = torch.full((12,), -1.0)
    segments.read_(6, 18, window)
    assert torch.equal(window, expected[6:18])
    segments.write_(3, 17, torch.arange(100.0, 114.0))
    assert parts[0].tolist() == [0.0, 1.0, 2.0, 100.0, 101.0]
    assert parts[1].tolist() == [105.0, 106.0, 107.0]
    assert parts[2].tolist() == [113.0, 21.0, 22.0, 23.0]


def test_whole_tensor_and_empty_segments() -> None:
    flat = torch.zeros(6)
    segments = Segments.whole(flat)
    segments.write_(2, 5, torch.ones(3))
    assert flat.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    only_empty = Segments([(0, torch.zeros(0))], 4)
    only_empty.write_(0, 4, torch.ones(4))  # nothing to write: padding only
    assert only_empty.dtype == torch.float32 and only_empty.parts == []


def test_overlapping_or_too_long_segments_are_refused() -> None:
    with pytest.raises(ValueError, match=r"overlap or pass the bucket's 8 elements: \(start, numel\) \[\(0, 5\), \(4, 2\)\]"):
        Segments([(0, torch.zeros(5)), (4, torch.zeros(2))], 8)
    with pytest.raises(ValueError, match="pass the bucket's 4 elements"):
        Segments([(0, torch.zeros(5))], 4)
