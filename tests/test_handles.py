"""Process handles (server/handles.py) without a server: what a handle is, what each wrong one is
answered with, and that no error quotes a token."""

import pytest

from mmsim.server import errors
from mmsim.server.handles import ECHO_MAX, HANDLE_MAX, HANDLE_RE, BadRequest, Handles, ProcessNotFound, echo
from mmsim.server.topology import Topology

GENERATION = 1_700_000_000_000


def registry(index: int = 1, live: set[int] | None = None) -> tuple[Handles, set[int]]:
    """Shard ``index`` of three (shard 2 serves at a known address), and its live pids."""
    live = set() if live is None else live
    return Handles(Topology.standalone(index, GENERATION, "", ["a:1", "b:2", "c:3"]), live), live


def test_an_issued_handle_names_its_process_until_revoked() -> None:
    handles, live = registry()
    live.update({7, 8})
    seven, eight = handles.issue(7), handles.issue(8)
    assert seven.pid == 7 and seven.handle.startswith(f"1.{GENERATION}.7.")
    assert HANDLE_RE.fullmatch(seven.handle) and len(seven.handle) <= HANDLE_MAX
    assert seven.handle != eight.handle
    assert handles.pid(seven.handle) == 7 and handles.pid(eight.handle) == 8
    handles.revoke(7)
    handles.revoke(7)  # twice: nothing more
    with pytest.raises(ProcessNotFound) as e:
        handles.pid(seven.handle)  # revoked though its pid is still live
    assert e.value.reason == errors.PROCESS_NOT_FOUND
    assert handles.pid(eight.handle) == 8


def test_a_process_gone_from_the_model_is_not_found_before_its_handle_is_revoked() -> None:
    handles, live = registry(live={3})
    handle = handles.issue(3).handle
    live.discard(3)  # an exit under way
    with pytest.raises(ProcessNotFound) as e:
        handles.pid(handle)
    assert e.value.reason == errors.PROCESS_NOT_FOUND and e.value.metadata == {"process": f"1.{GENERATION}.3.…"}


def test_a_wrong_token_is_not_found_and_never_quoted() -> None:
    handles, _ = registry(live={5})
    handle = handles.issue(5).handle
    forged = handle[:-32] + "0" * 32
    with pytest.raises(ProcessNotFound) as e:
        handles.pid(forged)
    assert e.value.reason == errors.PROCESS_NOT_FOUND and "0" * 12 not in str(e.value)
    assert handle[-32:] not in str(e.value)


@pytest.mark.parametrize(
    "handle, field",
    [
        ("", "process"),
        ("1.2.3", "process"),
        ("01.2.3." + "a" * 32, "process"),  # not canonical
        ("1.2.3." + "A" * 32, "src"),  # upper-case token
        ("1.2.3." + "a" * 32 + " ", "process"),
        ("1.2.３." + "a" * 32, "process"),  # a non-ASCII digit
        ("9" * 10_000, "process"),
    ],
)
def test_what_is_not_a_handle_is_a_bad_request(handle: str, field: str) -> None:
    handles, _ = registry()
    with pytest.raises(BadRequest) as e:
        handles.pid(handle, field)
    [(named, description)] = e.value.violations
    assert named == field
    assert len(description) < 200 and "a" * 12 not in description and "A" * 12 not in description


def test_a_handle_of_another_shard_names_it() -> None:
    handles, _ = registry(index=1)
    with pytest.raises(ProcessNotFound) as e:
        handles.pid(f"2.{GENERATION}.4." + "b" * 32)
    assert e.value.reason == errors.WRONG_SHARD
    assert e.value.metadata == {"process": f"2.{GENERATION}.4.…", "shard": "2", "address": "c:3"}
    assert "shard 2 at c:3; this is shard 1" in str(e.value) and "b" * 12 not in str(e.value)
    with pytest.raises(ProcessNotFound) as e:
        handles.pid(f"9.{GENERATION}.4." + "b" * 32)  # a shard this one does not know
    assert e.value.reason == errors.WRONG_SHARD and e.value.metadata["address"] == ""


def test_a_call_for_another_shard_names_it() -> None:
    handles, _ = registry(index=0)
    exc = handles.wrong_shard(1)
    assert exc.reason == errors.WRONG_SHARD and exc.metadata == {"shard": "1", "address": "b:2"}
    assert str(exc) == "the call asks for shard 1 at b:2; this is shard 0"


def test_a_handle_of_an_earlier_generation_says_the_shard_restarted() -> None:
    handles, _ = registry(index=1)
    with pytest.raises(ProcessNotFound) as e:
        handles.pid(f"1.{GENERATION - 1}.4." + "c" * 32)
    assert e.value.reason == errors.SHARD_RESTARTED
    assert e.value.metadata["shard"] == "1" and e.value.metadata["generation"] == str(GENERATION)
    with pytest.raises(ProcessNotFound) as e:
        handles.pid(f"1.{GENERATION + 1}.4." + "c" * 32)  # a later one: simply unknown
    assert e.value.reason == errors.PROCESS_NOT_FOUND


def test_echo_is_bounded_and_drops_tokens() -> None:
    token = "0123456789abcdef" * 2
    assert echo(f"3.17.42.{token}") == "3.17.42.…"
    assert echo(f"x{token}y") == "x…y"
    assert echo("short") == "short"
    long = "z" * (ECHO_MAX + 10)
    assert echo(long) == "z" * ECHO_MAX + f"… ({len(long)} characters)"
    assert echo("ab" * 3) == "ababab"  # below a token's length: kept
