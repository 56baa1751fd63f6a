"""MkDocs hooks: the package tree the API reference is read from, and the site's view of Markdown
files and links outside docs/.

The packages of the distribution live in directories of other names (``client/`` is
``mmsim.client``, as ``[tool.setuptools.package-dir]`` in ``pyproject.toml`` maps them), which
griffe cannot follow through the editable install; ``on_startup`` lays them out as ``mmsim/...``
under ``PACKAGES`` (symbolic links, ``mmsim.server.tools.package_tree``), the path ``mkdocstrings``
reads them from.

A page of ``SHOWN`` shows a Markdown file from the top of the repository (``BENCHMARKS.md``), its
relative links rebased onto the page. A link to a file of the repository that the site does not
hold (a script, ``examples/``) shows as its text: it works where the Markdown is read in the
repository, and the site has nothing to point it at. A link to a file that exists nowhere is left
as it is, for ``mkdocs build --strict`` to report.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mmsim.server.tools.package_tree import lay_out

#: docs page -> the repository file (relative to the top) it shows.
SHOWN = {"benchmarks.md": "BENCHMARKS.md"}
#: Where the package tree is laid out, relative to the top (the python handler's ``paths``).
PACKAGES = "build/docs-packages"

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"\n]*\")?\)")


def on_startup(command: str, dirty: bool) -> None:
    """Lay out the distribution's packages under ``PACKAGES`` as their import names say (before any
    plugin reads its configuration)."""
    top = Path(__file__).resolve().parent.parent
    lay_out(top / PACKAGES, top)


def _relative(target: str) -> bool:
    """Whether a link target is a path relative to the Markdown file (not a URL, anchor or absolute path)."""
    parts = urlsplit(target)
    return not (parts.scheme or parts.netloc or target.startswith(("/", "#")))


def _rewrite(markdown: str, src_dir: str, docs: Path, top: Path) -> str:
    """Rebase the relative links of ``markdown``, written in ``src_dir`` (relative to ``top``), onto
    ``docs``, and show a link to a repository file outside ``docs`` as its text. Fenced code is left
    as it is."""

    def link(m: re.Match[str]) -> str:
        target = m["target"]
        if not _relative(target):
            return m[0]
        path, sep, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(src_dir, path))
        rebased = posixpath.relpath(repo_path, docs.relative_to(top).as_posix())
        if rebased.startswith("../") and (top / repo_path).exists() and not m["bang"]:
            return m["text"]
        return f"{m['bang']}[{m['text']}]({rebased}{sep}{anchor}{m['title'] or ''})"

    out, end = [], 0
    for fence in _FENCE.finditer(markdown):
        out.append(_LINK.sub(link, markdown[end : fence.start()]))
        out.append(fence[0])
        end = fence.end()
    out.append(_LINK.sub(link, markdown[end:]))
    return "".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """The page's Markdown as the site shows it (see the module's docstring)."""
    docs = Path(config["docs_dir"]).resolve()
    top = Path(config["config_file_path"]).resolve().parent
    shown = SHOWN.get(page.file.src_uri)
    if shown is not None:
        return _rewrite((top / shown).read_text(encoding="utf-8"), posixpath.dirname(shown), docs, top)
    src_dir = (docs / page.file.src_uri).parent.relative_to(top).as_posix()
    return _rewrite(markdown, src_dir, docs, top)

