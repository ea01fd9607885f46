"""The checked-in generated code matches the protos (regenerated and compared)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_has_no_drift():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "genproto.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grpcio_tools_in_lockstep_with_grpcio():
    import grpc
    from importlib.metadata import version
    assert version("grpcio-tools") == grpc.__version__
