"""``mmsim serve`` as a separate OS process, for tests that need one (RSS, signals, load)."""

from mmsim.client.testing import ServerProcess
from mmsim.client.testing import serve_subprocess as mmsim_serve

__all__ = ["ServerProcess", "mmsim_serve"]
