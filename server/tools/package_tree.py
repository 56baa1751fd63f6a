"""The distribution's packages laid out as their import names say, for tools that read source files
rather than import them.

The packages live in directories of other names (``client/`` is ``mmsim.client``, as
``[tool.setuptools.package-dir]`` in ``pyproject.toml`` maps them). The editable install's import
hook follows that mapping; mypy and griffe (mkdocstrings) read directories, and cannot. ``lay_out``
gives them a tree of symbolic links, ``DEST/mmsim/client -> client/`` and so on: ``mypy_path`` and
the docs' python handler point at ``DEST``.

``python -m mmsim.server.tools.package_tree DEST`` lays the tree out under ``DEST`` (relative to
the top of the repository).
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

#: The top of the repository: the directory of ``pyproject.toml``.
TOP = Path(__file__).resolve().parent.parent.parent


def package_dirs(top: Path = TOP) -> dict[str, Path]:
    """Each package of ``[tool.setuptools.package-dir]`` in ``top``'s ``pyproject.toml`` -> its directory."""
    with (top / "pyproject.toml").open("rb") as f:
        mapping: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {name: (top / directory).resolve() for name, directory in mapping.items()}


def lay_out(dest: Path, top: Path = TOP) -> list[Path]:
    """Link each package of ``top``'s package-dir mapping under ``dest`` by its import name
    (``dest/mmsim/client`` -> ``top/client``), replacing a link that points elsewhere; the links."""
    links = []
    for name, directory in package_dirs(top).items():
        link = dest.joinpath(*name.split("."))
        links.append(link)
        if link.is_symlink() and link.resolve() == directory:
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(directory, target_is_directory=True)
    return links


def main(argv: list[str] | None = None) -> int:
    """``python -m mmsim.server.tools.package_tree DEST``: lay the packages out under ``DEST``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mmsim.server.tools.package_tree DEST", file=sys.stderr)
        return 2
    lay_out(TOP / args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
