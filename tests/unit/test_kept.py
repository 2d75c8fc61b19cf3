"""KeptByIdentity: values found again only for the very objects they were kept for."""

from __future__ import annotations

from shardoptim.kept import KeptByIdentity


class _Obj:
    pass


def test_hit_only_for_the_same_objects_and_extra() -> None:
    kept: KeptByIdentity[str] = KeptByIdentity(8)
    a, b = _Obj(), _Obj()
    assert kept.put([a, b], "plan", extra=(0, 1)) == "plan"
    assert kept.get([a, b], extra=(0, 1)) == "plan"
    assert kept.get([a, b], extra=(1, 1)) is None
    assert kept.get([b, a], extra=(0, 1)) is None
    assert kept.get([a], extra=(0, 1)) is None


def test_a_reused_id_is_a_miss() -> None:
    kept: KeptByIdentity[str] = KeptByIdentity(8)
    a = _Obj()
    kept.put([a], "plan")
    impostor = _Obj()
    # NOTE: stands in for a new object at the dead one's address: same key, different object.
    key = next(iter(kept._kept))  # noqa: SLF001
    kept._kept[(None, id(impostor))] = kept._kept.pop(key)  # noqa: SLF001
    assert kept.get([impostor]) is None


def test_drops_everything_past_the_bound() -> None:
    kept: KeptByIdentity[int] = KeptByIdentity(2)
    objs = [_Obj() for _ in range(3)]
    for i, obj in enumerate(objs):
        kept.put([obj], i)
    assert len(kept) == 1 and kept.get([objs[2]]) == 2 and kept.get([objs[0]]) is None
    kept.clear()
    assert len(kept) == 0
