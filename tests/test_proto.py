"""The committed generated code is what `make proto` produces from the .proto."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("mmsim_pb2.py", "mmsim_pb2.pyi", "mmsim_pb2_grpc.py")


def test_regeneration_leaves_no_diff(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto/mmsim/v1/mmsim.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "mmsim/v1" / name).read_text()
        committed = (ROOT / "proto/mmsim/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"


def test_generated_code_imports_as_mmsim_v1() -> None:
    from mmsim.v1 import mmsim_pb2, mmsim_pb2_grpc

    assert mmsim_pb2.DESCRIPTOR.package == "mmsim.v1"
    assert hasattr(mmsim_pb2_grpc, "MemoryManagerStub")
