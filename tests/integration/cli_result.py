"""What a `python -m cloudml.cli.main ...` run of a test gives back: its exit
code, stdout and stderr, with the checks the CLI tests make on them
(tests/integration/test_cli_sdk.py, test_models_service_cli.py)."""
from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        assert self.code == 0, self.err
        return json.loads(self.out)

    def error_line(self) -> str:
        """The single stderr line of a failed command."""
        assert self.code != 0, self.out
        assert "Traceback" not in self.err, self.err
        lines = self.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), self.err
        return lines[0]
