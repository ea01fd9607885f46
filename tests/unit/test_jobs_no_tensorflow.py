"""The jobs service must never import TensorFlow (~6 s and ~570 MB per process)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_jobs_module_imports_tensorflow():
    modules = sorted(p.stem for p in (ROOT / "services" / "jobs").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module('services.jobs.' + name)\n"
        "import services.common.runtime.local\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorboard', 'keras'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported: {result.stdout.strip()}"
