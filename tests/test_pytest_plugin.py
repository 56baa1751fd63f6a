"""The pytest plugin shipped with the SDK: its fixtures are available to any test session
where mmsim is installed (entry point ``pytest11``), without importing anything."""

import pytest

from mmsim.client import Client, LimitExceededError


async def test_mmsim_client_fixture_talks_to_a_fresh_server(mmsim_client: Client, mmsim_server: str) -> None:
    assert mmsim_server.startswith("127.0.0.1:")
    p = await mmsim_client.create_process()
    v = await p.mmap(4096)
    await p.write(v.start, 7)
    assert await p.read(v.start) == 7
    assert (await mmsim_client.stats())["processes"] == 1  # a server of this test's own
    assert await mmsim_client.check_invariants() == []


class TestOptions:
    @pytest.fixture
    def mmsim_server_options(self) -> dict[str, object]:
        return {"max_processes": 1}

    async def test_options_reach_the_server(self, mmsim_client: Client) -> None:
        await mmsim_client.create_process()
        with pytest.raises(LimitExceededError):
            await mmsim_client.create_process()
