"""mmsim.server.tools.package_tree: the packages laid out by import name, for mypy and the docs."""

from pathlib import Path

from mmsim.server.tools.package_tree import TOP, lay_out, package_dirs


def test_lays_out_each_package_by_its_import_name(tmp_path: Path) -> None:
    links = lay_out(tmp_path)
    assert {link.relative_to(tmp_path).as_posix() for link in links} == {
        "mmsim/server", "mmsim/client", "mmsim/loadgen", "mmsim/v1"}
    assert (tmp_path / "mmsim" / "client").resolve() == (TOP / "client").resolve()
    assert (tmp_path / "mmsim" / "v1" / "mmsim.proto").is_file()
    assert package_dirs()["mmsim.v1"] == (TOP / "proto" / "mmsim" / "v1").resolve()


def test_a_link_pointing_elsewhere_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "mmsim").mkdir()
    (tmp_path / "mmsim" / "client").symlink_to(TOP / "loadgen", target_is_directory=True)
    lay_out(tmp_path)
    lay_out(tmp_path)  # idempotent
    assert (tmp_path / "mmsim" / "client").resolve() == (TOP / "client").resolve()
