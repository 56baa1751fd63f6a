"""Tests of code that uses mmsim, with the fixtures of the plugin that installing mmsim registers:
``mmsim_client`` is a Client connected to a fresh in-process server started for each test."""

import errno

import pytest

from mmsim.client import Client

PAGE = 4096


async def test_remap_moves_the_page(mmsim_client: Client) -> None:
    p = await mmsim_client.create_process()
    src = await p.mmap(PAGE)
    dst = await p.mmap(PAGE, uffd="missing")
    await p.write(src.start, 42)
    assert await p.remap(dst.start, src.start, PAGE) == PAGE
    assert await p.read(dst.start) == 42
    assert [addr for _, addr in (await p.walk(dst.start)).mappings] == [dst.start]


async def test_a_shared_page_cannot_be_moved(mmsim_client: Client) -> None:
    p = await mmsim_client.create_process()
    src = await p.mmap(PAGE)
    dst = await p.mmap(PAGE, uffd="missing")
    await p.write(src.start, 1)
    await p.fork()
    with pytest.raises(OSError) as e:
        await p.remap(dst.start, src.start, PAGE)
    assert e.value.errno == errno.EBUSY
