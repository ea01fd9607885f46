"""Never installed: see setup.py."""
