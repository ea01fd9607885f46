"""Unreachable: the package fails to install (see setup.py)."""
raise SystemExit("broken_trainer.task should never run")
