"""pytest fixtures for code that uses the SDK (registered as the ``mmsim`` pytest11 plugin).

``mmsim_server`` yields the address of an in-process server, started per test with the options
returned by the ``mmsim_server_options`` fixture (override it to change them); ``mmsim_client``
yields a :class:`~mmsim.client.Client` connected to it.

Both are async fixtures run by pytest-asyncio (``pip install 'mmsim[test]'`` or
``pip install pytest-asyncio``) in the test's function-scoped event loop. A project using them
needs this configuration, in ``pyproject.toml`` (or the same two keys under ``[pytest]`` in
``pytest.ini``)::

    [tool.pytest.ini_options]
    asyncio_mode = "auto"
    asyncio_default_fixture_loop_scope = "function"

and then::

    async def test_remap(mmsim_client):
        p = await mmsim_client.create_process()
        ...

(With ``asyncio_mode = "strict"``, mark each such test ``@pytest.mark.asyncio`` instead.)

Without pytest-asyncio this plugin still loads, so installing mmsim never breaks an unrelated
pytest run; only a test that requests these fixtures fails, saying what is missing.
"""

from __future__ import annotations

import sys
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ._client import Client
from .testing import serve_in_process

#: The configuration a project needs for the fixtures (pyproject.toml).
CONFIGURATION = """\
[tool.pytest.ini_options]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
"""

NEEDS_PYTEST_ASYNCIO = (
    "the mmsim fixture {name!r} is an async fixture and needs the pytest-asyncio plugin, which is "
    "{why}. Install it (pip install 'mmsim[test]', or pip install pytest-asyncio) and configure it, "
    "e.g. in pyproject.toml:\n\n" + CONFIGURATION
)


@pytest.fixture
def mmsim_server_options() -> dict[str, Any]:
    """Options of the ``mmsim_server`` fixture (``ServerConfig`` fields); override to change them."""
    return {}


async def mmsim_server(mmsim_server_options: dict[str, Any]) -> AsyncIterator[str]:
    """The address ("127.0.0.1:PORT") of an mmsim server running in the test's event loop."""
    async with serve_in_process(**mmsim_server_options) as address:
        yield address


async def mmsim_client(mmsim_server: str) -> AsyncIterator[Client]:
    """A Client connected to ``mmsim_server``."""
    async with Client(mmsim_server) as client:
        yield client


def _pytest_asyncio_missing(config: pytest.Config) -> str | None:
    """Why pytest-asyncio cannot run async fixtures in this session, or None when it can.

    pytest_asyncio is imported only here, guarded: an absent or broken one must not break the session.
    """
    plugin = sys.modules.get("pytest_asyncio.plugin")
    if plugin is not None and config.pluginmanager.is_registered(plugin):
        return None
    try:
        import pytest_asyncio  # noqa: F401
    except ImportError:
        return "not installed"
    except Exception as exc:  # a broken installation: say so, and keep the session running
        return f"installed but fails to import ({exc!r})"
    return "installed but not enabled in this session (-p no:asyncio, or PYTEST_DISABLE_PLUGIN_AUTOLOAD)"


def _refusal(name: str, why: str) -> Any:
    def refuse() -> None:
        pytest.fail(NEEDS_PYTEST_ASYNCIO.format(name=name, why=why), pytrace=False)

    refuse.__doc__ = f"Unavailable: pytest-asyncio is {why}."
    return pytest.fixture(refuse, name=name)


def pytest_configure(config: pytest.Config) -> None:
    """Register ``mmsim_server`` and ``mmsim_client``: run by pytest-asyncio in the test's
    function-scoped loop where it is active, and otherwise failing, when requested, with what is
    missing (pytest's own refusal of an async fixture would not say)."""
    fixtures = types.ModuleType(f"{__name__}.fixtures")
    why = _pytest_asyncio_missing(config)
    for func in (mmsim_server, mmsim_client):
        if why is None:
            import pytest_asyncio

            fixture = pytest_asyncio.fixture(func, loop_scope="function")
        else:
            fixture = _refusal(func.__name__, why)
        setattr(fixtures, func.__name__, fixture)
    config.pluginmanager.register(fixtures, f"{__name__}.fixtures")
