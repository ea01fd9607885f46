"""The tuner service (and `cloudml hp`) must never import TensorFlow (~6 s and
~570 MB per process), even with Optuna and its samplers loaded; and it loads
Optuna itself only when a study needs a sampler."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def import_every_tuner_module() -> str:
    """Python code that imports each module of services/tuner."""
    modules = sorted(p.stem for p in (ROOT / "services" / "tuner").glob("*.py") if p.stem != "__init__")
    return ("import importlib, logging, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module('services.tuner.' + name)\n")


def suggest_code(algorithms: str, parameters: str) -> str:
    """Python code that asks one suggestion of each of `algorithms` (names of
    pb.Algorithm members) for a study with `parameters` (names, ranges 0-1)."""
    return ("from cloudml.tuner.v1 import tuner_service_pb2 as pb\n"
            "from services.tuner import algorithms, spec\n"
            f"for a in {algorithms}:\n"
            "    s = pb.StudySpec(goal=1, metric='m', algorithm=getattr(pb, a), max_trials=3, seed=1)\n"
            "    s.trial_template.module_name = 't'\n"
            f"    for name in {parameters}:\n"
            "        s.parameters.add(name=name, double_range=pb.DoubleRange(min=0, max=1))\n"
            "    algorithms.suggest(spec.normalize(s), [], None, 2)\n")


def run_python(code: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_no_tuner_module_imports_tensorflow():
    result = run_python(
        import_every_tuner_module() +
        "import cloudml.cli.commands.hp, cloudml.hpspec\n" +
        suggest_code("('ALGORITHM_TPE', 'ALGORITHM_CMAES', 'ALGORITHM_RANDOM')", "('x', 'y')") +
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorboard', 'keras', 'torch'))\n"
        "print(','.join(bad))\n"
    )
    assert result.stdout.strip() == "", f"imported: {result.stdout.strip()}"


def test_optuna_loads_on_the_first_suggestion_and_stays_quiet():
    """The tuner's modules leave Optuna (~20 MB) unloaded until a study needs a
    sampler; Optuna's per-trial INFO lines stay out of the service's log."""
    result = run_python(
        import_every_tuner_module() +
        "print('optuna' in sys.modules)\n" +
        suggest_code("('ALGORITHM_TPE',)", "('x',)") +
        "print('optuna' in sys.modules, logging.getLogger('optuna').getEffectiveLevel())\n"
    )
    assert result.stdout.split() == ["False", "True", "30"], result.stdout
    assert "A new study created" not in result.stderr, result.stderr
