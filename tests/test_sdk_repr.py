"""The SDK's result types print addresses, page offsets and folio indexes in hex, as the README and
the error messages do; values, counts and ids stay decimal, and they stay plain dataclasses."""

import dataclasses

import pytest

from mmsim.client import AnonVma, Client, FolioInfo, Vma, WalkResult
from mmsim.client.testing import serve_in_process

P = 4096


def test_vma_repr() -> None:
    v = Vma(
        start=0x7F0000000000,
        end=0x7F0000004000,
        prot="rw",
        uffd="missing",
        dontfork=False,
        wipeonfork=True,
        pgoff=0x7F0000000,
        anon_vma=12,
    )
    assert repr(v) == (
        "Vma(start=0x7f0000000000, end=0x7f0000004000, prot='rw', uffd='missing', dontfork=False, "
        "wipeonfork=True, pgoff=0x7f0000000, anon_vma=12)"
    )
    assert "anon_vma=None" in repr(dataclasses.replace(v, anon_vma=None))


def test_folio_repr() -> None:
    f = FolioInfo(
        zero_page=False, value=42, mapcount=3, exclusive=True, index=0x200000, anon_vma=10, writable=True, young=False
    )
    assert repr(f) == (
        "FolioInfo(zero_page=False, value=42, mapcount=3, exclusive=True, index=0x200000, anon_vma=10, "
        "writable=True, young=False, order=0, pmd=False, pinned=False)"
    )
    assert repr(dataclasses.replace(f, order=9, pmd=True)).endswith("young=False, order=9, pmd=True, pinned=False)")


@pytest.mark.parametrize("pid", [1234, 4096])
def test_walk_repr(pid: int) -> None:
    mappings = [(pid, 0x200000000), (pid, 0x7F0000001000)]
    w = WalkResult(referenced=2, contended=False, mappings=mappings, fast_retries=1, slow_retries=0)
    assert repr(w) == (
        f"WalkResult(referenced=2, contended=False, mappings=[({pid}, 0x200000000), ({pid}, 0x7f0000001000)], "
        "fast_retries=1, slow_retries=0)"
    )
    assert repr(dataclasses.replace(w, referenced=-1, contended=True, mappings=[])).startswith(
        "WalkResult(referenced=-1, contended=True, mappings=[],"
    )


def test_anon_vma_repr() -> None:
    a = AnonVma(id=11, root=10, parent=10, refcount=3, num_children=0, num_active_vmas=2, vmas=[(2, 0x100000000)])
    assert repr(a) == (
        "AnonVma(id=11, root=10, parent=10, refcount=3, num_children=0, num_active_vmas=2, "
        "vmas=[(2, 0x100000000)])"
    )


def test_still_dataclasses_with_field_equality() -> None:
    args = dict(zero_page=False, value=1, mapcount=1, exclusive=True, index=0x10, anon_vma=1, writable=True, young=True)
    a, b = FolioInfo(**args), FolioInfo(**args)  # type: ignore[arg-type]
    assert a == b and hash(a) == hash(b)
    assert a != dataclasses.replace(a, index=0x11)
    for cls in (Vma, FolioInfo, WalkResult, AnonVma):
        assert dataclasses.is_dataclass(cls)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.value = 2  # type: ignore[misc]
    assert dataclasses.asdict(a)["index"] == 0x10


async def test_results_from_a_server_print_hex() -> None:
    async with serve_in_process(log_level="warning") as addr, Client(addr) as mm:
        p = await mm.create_process()
        src = await p.mmap(P, addr=0x100000000)
        await p.write(src.start, 42)
        assert "start=0x100000000, end=0x100001000" in repr(src)
        assert "value=42" in repr(await p.folio(src.start)) and "index=0x100000" in repr(await p.folio(src.start))
        assert ", 0x100000000)]" in repr(await p.walk(src.start))
        assert ", 0x100000000)]" in repr((await p.anon_vma_tree(src.start))[0])
