"""The documentation: the MkDocs site builds with ``--strict`` (every link and anchor resolves, the
API reference finds the SDK), and every relative link of README.md reaches a file that exists."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

ROOT = Path(__file__).resolve().parent.parent


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _targets(markdown: str) -> list[str]:
    """Every link and image target of ``markdown`` (inline, reference-style and autolinks)."""
    found: list[str] = []

    def visit(tokens: list[Token]) -> None:
        for token in tokens:
            if token.type == "link_open":
                found.append(str(token.attrs["href"]))
            elif token.type == "image":
                found.append(str(token.attrs["src"]))
            if token.children:
                visit(token.children)

    visit(MarkdownIt("commonmark").parse(markdown))
    return found


def _broken_links(markdown: str, base: Path) -> list[str]:
    """The relative links of ``markdown`` (a file in ``base``) whose file does not exist, or whose
    anchor names no heading of the Markdown file it points at."""
    broken = []
    for target in _targets(markdown):
        parts = urlsplit(target)
        if parts.scheme or parts.netloc or not parts.path:
            continue
        path = (base / unquote(parts.path)).resolve()
        if not path.exists():
            broken.append(target)
        elif parts.fragment and path.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", path.read_text(encoding="utf-8"), re.M)
            if parts.fragment not in {_slug(h) for h in headings}:
                broken.append(target)
    return broken


def test_readme_links_reach_files() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = _targets(readme)
    assert "docs/server.md" in targets and "examples/README.md" in targets, targets
    assert _broken_links(readme, ROOT) == []


def test_the_link_check_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Its section\n")
    markdown = (
        "[ok](docs/page.md) [ok](docs/page.md#its-section) [ok](https://example.org/x.md) [ok](#top)\n"
        "[gone](docs/missing.md) ![gone](img/none.png) [bad anchor](docs/page.md#nowhere)\n\n"
        "[ref]: docs/also-missing.md\n\nsee [ref]\n\n```\n[in code](not-a-link.md)\n```\n"
    )
    assert _broken_links(markdown, tmp_path) == [
        "docs/missing.md",
        "img/none.png",
        "docs/page.md#nowhere",
        "docs/also-missing.md",
    ]


def _hooks() -> ModuleType:
    """docs/hooks.py, the site's MkDocs hooks, as a module."""
    spec = importlib.util.spec_from_file_location("mmsim_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hooks_rebase_links_for_the_site() -> None:
    hooks = _hooks()
    docs = ROOT / "docs"
    page = (
        "[server](server.md#errors) [examples](../examples/README.md) [gone](../no-such-file.py)\n"
        "![plot](img/loadgen-race-recheck.png) [web](https://example.org/a.md) [here](#top)\n"
        "```\n[code](../examples/README.md)\n```\n"
    )
    assert hooks._rewrite(page, "docs", docs, ROOT) == (
        "[server](server.md#errors) examples [gone](../no-such-file.py)\n"
        "![plot](img/loadgen-race-recheck.png) [web](https://example.org/a.md) [here](#top)\n"
        "```\n[code](../examples/README.md)\n```\n"
    )
    # A file from the top of the repository, shown as a docs page: its links are rebased onto docs/.
    top_level = "[plot](docs/img/loadgen-race-recheck.png) [bench](benchmarks/model_bench.py) [x](nope.md)"
    assert hooks._rewrite(top_level, "", docs, ROOT) == "[plot](img/loadgen-race-recheck.png) bench [x](../nope.md)"


def test_site_builds_strict(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("server", "sdk", "access-control", "deployment", "loadgen", "loadgen-report", "model",
                 "protocol", "mutants", "conformance", "testing", "benchmarks", "api"):
        assert (site / page / "index.html").is_file(), page
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("mmsim.client.Client", "mmsim.client.Process", "mmsim.client.ops", "mmsim.client.errors",
                 "mmsim.client.testing"):
        assert f'id="{name}"' in api, name
    # BENCHMARKS.md is shown in full, its plots linked where the site has them.
    benchmarks = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert "benchmarks/model_bench.py" in benchmarks and 'href="../img/loadgen-race-recheck.png"' in benchmarks
    assert (site / "img" / "loadgen-race-recheck.png").is_file()
