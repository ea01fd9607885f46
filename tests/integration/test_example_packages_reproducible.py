"""examples/build_packages.py gives the same bytes for the same sources, so a
job submitted again with a fresh build of the same trainer is the same job
(same upload name, same spec), not a conflicting one."""
from __future__ import annotations

import hashlib
import tarfile

from examples.build_packages import FIXED_MTIME, build_all


def test_two_builds_of_the_same_trainer_are_byte_identical(tmp_path):
    first = build_all(str(tmp_path / "a"), ["linear"])["linear"]
    second = build_all(str(tmp_path / "b"), ["linear"])["linear"]
    digest = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (first, second)]
    assert digest[0] == digest[1]
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid) for m in members} == {(FIXED_MTIME, 0, 0)}
    assert any(m.name.endswith("trainer/task.py") for m in members)
