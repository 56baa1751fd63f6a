"""pytest fixtures for code that uses the SDK (registered as the ``mmsim`` pytest11 plugin).

``mmsim_server`` yields the address of an in-process server, started per test with the options
returned by the ``mmsim_server_options`` fixture (override it to change them); ``mmsim_client``
yields a :class:`~mmsim.client.Client` connected to it.

``mmsim_server_options`` are ``ServerConfig`` fields (``protocol``, ``seed``, ``max_processes``,
...). With ``{"shards": N}`` and N above 1, ``mmsim_server`` runs ``mmsim serve --shards N`` as a
separate OS process instead (the other options become its flags: ``max_processes=5`` is
``--max-processes 5``) and yields shard 0's address; the client discovers the other shards.

**An existing deployment.** With ``--mmsim-target HOST:PORT`` (or ``MMSIM_TARGET`` in the
environment), ``mmsim_server`` starts nothing and yields that address, and ``mmsim_client``
connects to it, with ``--mmsim-token-file FILE``, ``--mmsim-tls-ca FILE``, ``--mmsim-tls-cert FILE``
and ``--mmsim-tls-key FILE`` (``MMSIM_TOKEN_FILE``, ``MMSIM_TLS_CA``, ``MMSIM_CLIENT_TLS_CERT``,
``MMSIM_CLIENT_TLS_KEY``) as its credentials: TLS when a CA or a client certificate is given. The address
may be one server, a shard of ``mmsim serve --shards N`` or a proxy in front of the shards: the
client discovers which. ``mmsim_server_options`` are then not used, and every test shares that
deployment's state (what other tests left, their processes among it). Without a target, the
client of a server whose options name a ``token_file`` sends that token.

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

import asyncio
import os
import sys
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ._client import Client
from .credentials import read_token, tls_credentials
from .testing import serve_in_process, serve_subprocess

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


#: The plugin's command-line options: (option, environment variable, help).
OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--mmsim-target", "MMSIM_TARGET",
     "HOST:PORT of an mmsim deployment (a server, a shard or a proxy) for the mmsim fixtures, instead of "
     "a server started per test"),
    ("--mmsim-token-file", "MMSIM_TOKEN_FILE", "the bearer token of --mmsim-target, in this file"),
    ("--mmsim-tls-ca", "MMSIM_TLS_CA", "TLS to --mmsim-target: trust the PEM CA certificates in this file"),
    ("--mmsim-tls-cert", "MMSIM_CLIENT_TLS_CERT", "TLS to --mmsim-target: present this PEM client certificate"),
    ("--mmsim-tls-key", "MMSIM_CLIENT_TLS_KEY", "the PEM private key of --mmsim-tls-cert"),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mmsim", "mmsim fixtures (mmsim_server, mmsim_client)")
    for option, env, help_ in OPTIONS:
        group.addoption(option, metavar="HOST:PORT" if option == "--mmsim-target" else "FILE", default=None,
                        help=f"{help_} (env {env})")


def _setting(config: pytest.Config, option: str) -> str | None:
    """An option's value: the command line's, else its environment variable's."""
    env = next(e for o, e, _ in OPTIONS if o == option)
    value = config.getoption(option.lstrip("-").replace("-", "_"), None) or os.environ.get(env, "")
    return value.strip() or None


@pytest.fixture
def mmsim_server_options() -> dict[str, Any]:
    """Options of the ``mmsim_server`` fixture (``ServerConfig`` fields); override to change them."""
    return {}


def _flags(options: dict[str, Any]) -> list[str]:
    """``mmsim serve`` flags for ServerConfig fields: ``max_processes=5`` -> ``--max-processes 5``."""
    out: list[str] = []
    for name, value in options.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        out += [f"--{name.replace('_', '-')}", str(value)]
    return out


async def mmsim_server(mmsim_server_options: dict[str, Any], pytestconfig: pytest.Config) -> AsyncIterator[str]:
    """The address ("HOST:PORT") of the mmsim deployment the test uses: ``--mmsim-target``, or a
    server running in the test's event loop, or ``mmsim serve --shards N`` (options ``shards`` > 1)."""
    target = _setting(pytestconfig, "--mmsim-target")
    if target is not None:
        yield target
        return
    options = dict(mmsim_server_options)
    shards = int(options.pop("shards", 1))
    if shards <= 1:
        async with serve_in_process(**options) as address:
            yield address
        return
    server = serve_subprocess("--shards", str(shards), *_flags(options))
    started = await asyncio.to_thread(server.__enter__)  # it waits for every shard: not on the loop
    try:
        yield started.addr
    finally:
        await asyncio.to_thread(server.__exit__, None, None, None)


async def mmsim_client(
    mmsim_server: str, mmsim_server_options: dict[str, Any], pytestconfig: pytest.Config
) -> AsyncIterator[Client]:
    """A Client connected to ``mmsim_server`` (with the credentials of ``--mmsim-target``)."""
    credentials = token = None
    if _setting(pytestconfig, "--mmsim-target") is not None:
        ca, cert, key = (_setting(pytestconfig, o) for o in ("--mmsim-tls-ca", "--mmsim-tls-cert", "--mmsim-tls-key"))
        if ca or cert:
            credentials = tls_credentials(ca, cert, key)
        token_file = _setting(pytestconfig, "--mmsim-token-file")
    else:
        token_file = mmsim_server_options.get("token_file") or None
    if token_file:
        token = read_token(token_file)
    async with Client(mmsim_server, credentials=credentials, token=token) as client:
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
    except Exception as exc:  # noqa: BLE001 - a broken installation: say so, and keep the session running
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
