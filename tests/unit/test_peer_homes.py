"""Which buckets move into a peer region, and how their parameters' homes are carved (one process).

A region here is one anonymous shared mapping standing in for this rank's file, with no peers
(what matters is the layout of the homes, not the other processes).
"""

from __future__ import annotations

import mmap

import torch

from shardoptim.buffers import FlatBuffers
from shardoptim.flat_layout import build_flat_layout
from shardoptim.peer_region import PeerFiles, PeerRegion


def _opener(calls: list[tuple[int, object]]):  # type: ignore[no-untyped-def]
    def open_region(nbytes: int, signature: object) -> PeerRegion:
        calls.append((nbytes, signature))
        return PeerRegion(mmap.mmap(-1, max(nbytes, 1)), PeerFiles([None, None]))

    return open_region


def _params() -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    big = torch.randn(200)
    conv = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)
    tied = torch.randn(8)
    params = [
        torch.nn.Parameter(torch.randn(5, 7)),  # bucket 0: owns its storage
        torch.nn.Parameter(conv),  # bucket 1: channels_last, owns its storage
        torch.nn.Parameter(big[10:60]),  # bucket 2: a view of a larger tensor
        torch.nn.Parameter(tied),  # bucket 3: two parameters sharing one storage
        torch.nn.Parameter(torch.empty(0)),
    ]
    params.append(torch.nn.Parameter(params[3].data))
    return params, big


def _layout(params: list[torch.Tensor]):  # type: ignore[no-untyped-def]
    keys = [0, 1, 2, 3, 3, 3]  # one bucket per key
    return build_flat_layout([p.numel() for p in params], num_shards=2, keys=keys, bucket_numel=1 << 20, align=16)


def test_own_storage_moves_only_parameters_alone_in_their_storage() -> None:
    params, _ = _params()
    layout = _layout(params)
    calls: list[tuple[int, object]] = []
    buffers = FlatBuffers(layout, params, full=False, open_region=_opener(calls))
    assert len(calls) == 1
    keys_of = {b: {pl.index for pl in bucket.placements} for b, bucket in enumerate(layout.buckets)}
    moved = {b for b, peer in enumerate(buffers.peers) if peer is not None}
    assert moved == {b for b, idx in keys_of.items() if idx & {0, 1}}, (moved, keys_of)
    homes = dict(buffers.homes())
    for index in (0, 1):  # carved from the region, each a storage of its own, values and layout kept
        home = homes[index]
        assert torch.equal(home, params[index]) and home.stride() == params[index].stride()
        assert home.untyped_storage().nbytes() == home.numel() * home.element_size()
        assert home.data_ptr() != params[index].data_ptr()
    for index in (2, 3, 5):  # left where they are: moving them would cut them off
        assert homes[index].data_ptr() == params[index].data_ptr()
    # the bucket in the peer region: every home at its offset, padding zero
    for b in moved:
        flat = buffers.peers[b].mine  # type: ignore[union-attr]
        for pl in layout.buckets[b].placements:
            home = homes[pl.index]
            assert home.data_ptr() == flat.data_ptr() + pl.start_global * home.element_size()
    signature = calls[0][1]
    assert [entry[0] for entry in signature] == sorted(moved)  # type: ignore[attr-defined]


def test_bucket_views_move_every_cpu_bucket() -> None:
    params, _ = _params()
    layout = _layout(params)
    calls: list[tuple[int, object]] = []
    buffers = FlatBuffers(layout, params, full=True, open_region=_opener(calls))
    assert all(peer is not None for peer in buffers.peers)
    for b, buffer in enumerate(buffers.buffers):
        assert buffer is not None and buffer.data_ptr() == buffers.peers[b].mine.data_ptr()  # type: ignore[union-attr]
    for index, home in buffers.homes():
        assert torch.equal(home, params[index])


def test_no_region_keeps_the_homes() -> None:
    params, _ = _params()
    buffers = FlatBuffers(_layout(params), params, full=False, open_region=lambda nbytes, signature: None)
    assert buffers.peers == [None] * 4
    for index, home in buffers.homes():
        assert home.data_ptr() == params[index].data_ptr() or params[index].numel() == 0
