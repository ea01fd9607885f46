"""The rules shared across the Python/C++ boundary stay one source
(services/common/native/protocol.py): the data plane's generated protocol.h
matches it, neither side spells a shared name itself, and the C++ picking
rules (dataplane/picking.h) choose as the Python ones do."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess

import pytest

from services.common.native import protocol

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPP_DIR = os.path.join(ROOT, "services", "common", "native", "dataplane")
SERVICES = os.path.join(ROOT, "services")

# Names only protocol.py (and the protocol.h generated from it) may spell.
SHARED = {*protocol.HOP_HEADERS, *protocol.HOP_PREFIXES, protocol.AUTHORIZATION, protocol.SECRET_ENV,
          protocol.ATTACH, protocol.PREDICTION_SERVICE, protocol.DATAPLANE_SERVICE,
          f"/{protocol.PREDICTION_SERVICE}/", f"/{protocol.DATAPLANE_SERVICE}/"}
CPP_STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
PLATFORM_NAME = re.compile(r"x-cloudml-[a-z0-9-]+")


def cpp_sources() -> dict[str, str]:
    return {name: open(os.path.join(CPP_DIR, name)).read() for name in sorted(os.listdir(CPP_DIR))
            if name.endswith((".cc", ".h")) and name != "protocol.h"}


def test_protocol_header_is_generated_from_the_python_module():
    with open(protocol.HEADER) as f:
        checked_in = f.read()
    assert checked_in == protocol.render_header(), (
        "services/common/native/dataplane/protocol.h differs from protocol.py: "
        "run .venv/bin/python -m services.common.native.protocol and rebuild (scripts/build_native.sh)")


def test_cpp_sources_take_shared_names_from_protocol_header():
    found = []
    for name, text in cpp_sources().items():
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith(("#include", "//")):
                continue
            for literal in CPP_STRING.findall(line):
                if literal in SHARED or PLATFORM_NAME.search(literal) or protocol.SECRET_ENV in literal:
                    found.append(f"{name}:{line_no}: {literal!r}")
    assert not found, "use protocol.h's constants (generated from protocol.py) instead of: " + ", ".join(found)


def test_cpp_sources_include_the_protocol_header_where_they_use_it():
    names = re.compile(r"\bk(?:SecretHeader|DecisionHeader|AuthHeader|ResolvedVersion|Authorization|SecretEnv|"
                       r"HopHeaders|HopPrefixes|PredictionService|ForwardedMethods|DataplaneService|Attach)\b")
    used = [name for name, text in cpp_sources().items() if names.search(text)]
    assert used, "the data plane no longer uses protocol.h"
    for name in used:
        text = cpp_sources()[name]
        assert re.search(r'#include "(protocol|metadata)\.h"', text), name
        for constant in names.findall(text):
            assert not re.search(rf"constexpr[^;]*\b{constant}\b\s*\[", text), f"{name} redefines {constant}"


def test_python_services_spell_no_platform_header_name_outside_protocol():
    """A platform header's name changed on one side only shows up here: every
    x-cloudml-* name in services/ is one protocol.py defines, and the gateway
    and common code import theirs instead of spelling them."""
    unknown, spelled = [], []
    for base, _, files in os.walk(SERVICES):
        for file in files:
            path = os.path.join(base, file)
            if not file.endswith(".py") or path == protocol.__file__:
                continue
            rel = os.path.relpath(path, ROOT)
            for name in PLATFORM_NAME.findall(open(path).read()):
                if name not in protocol.PLATFORM_HEADERS:
                    unknown.append(f"{rel}: {name}")
                elif rel.startswith(("services/gateway/", "services/common/")):
                    spelled.append(f"{rel}: {name}")
    assert not unknown, "x-cloudml-* names protocol.py does not define: " + ", ".join(unknown)
    assert not spelled, "import these from services.common.native.protocol: " + ", ".join(spelled)


def test_model_server_trusts_the_header_the_gateway_sends():
    # Read, not imported: the model server's modules load TF Serving's protos,
    # which other tests in the same process may have loaded from TensorFlow.
    path = os.path.join(SERVICES, "models", "model_server", "servicer.py")
    values = [node.value.value for node in ast.walk(ast.parse(open(path).read()))
              if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "ROUTED_VERSION_KEY" for t in node.targets)]
    assert values == [protocol.RESOLVED_VERSION_HEADER]


@pytest.mark.parametrize("key, hop", [
    ("user-agent", True), ("te", True), ("host", True), (":authority", True), ("grpc-timeout", True),
    ("grpc-accept-encoding", True), ("", True), (protocol.SECRET_HEADER, True),
    (protocol.RESOLVED_VERSION_HEADER, True), (protocol.ROUTE_DECISION_HEADER, True),
    (protocol.AUTH_DECISION_HEADER, True), ("authorization", False), ("x-request-id", False),
    ("tenant-bin", False),
])
def test_hop_headers(key, hop):
    assert protocol.is_hop_header(key) is hop


DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <iostream>
#include <sstream>
#include <string>
#include "picking.h"

struct Choice { int id; double weight; };

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    char kind;
    in >> kind;
    if (kind == 'w') {  // w <draw> <weight>...
      double draw, w;
      in >> draw;
      std::vector<Choice> choices;
      while (in >> w) choices.push_back({static_cast<int>(choices.size()), w});
      std::cout << cloudml::dataplane::PickWeighted(choices, draw).id << "\n";
    } else {  // t <i> <j> <load>...
      size_t i, j;
      int load;
      in >> i >> j;
      std::vector<int> loads;
      while (in >> load) loads.push_back(load);
      std::vector<const int*> candidates;
      for (const int& l : loads) candidates.push_back(&l);
      std::deque<size_t> draws{i, j};
      const int* picked = cloudml::dataplane::PickTwo(
          candidates, [&](size_t) { size_t d = draws.front(); draws.pop_front(); return d; },
          [](const int& l) { return l; });
      std::cout << (picked ? picked - loads.data() : -1) << "\n";
    }
  }
}
"""


@pytest.fixture(scope="module")
def picking_driver(tmp_path_factory):
    compiler = shutil.which("g++")
    assert compiler is not None, "g++ is missing: run scripts/setup.sh (its build_native.sh installs it)"
    d = tmp_path_factory.mktemp("picking")
    (d / "driver.cc").write_text(DRIVER)
    binary = str(d / "driver")
    subprocess.run([compiler, "-O2", "-std=c++17", "-I", CPP_DIR, "-o", binary, str(d / "driver.cc")], check=True)

    def run(lines: list[str]) -> list[int]:
        out = subprocess.run([binary], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
        return [int(x) for x in out.stdout.split()]
    return run


def test_cpp_picks_versions_by_weight_as_python(picking_driver):
    cases = []
    for weights in ([100.0], [90.0, 10.0], [50.0, 50.0], [1.0, 2.0, 3.0], [0.1, 0.2, 0.3, 0.4], [33.3, 33.3, 33.4]):
        total = sum(weights)
        for k in range(0, 41):
            cases.append((total * k / 40, weights))
        cases += [(sum(weights[:n]), weights) for n in range(1, len(weights) + 1)]  # exactly on a boundary
        cases.append((total + 1e-9, weights))  # past the end (rounding): the last
    lines = [" ".join(["w", repr(draw), *map(repr, weights)]) for draw, weights in cases]
    python = [protocol.pick_weighted(list(enumerate(weights)), draw=lambda _total, d=draw: d)
              for draw, weights in cases]
    assert picking_driver(lines) == python


def test_cpp_picks_replicas_by_two_choices_as_python(picking_driver):
    cases = [(0, 0, [3]), (0, 1, [2, 1]), (1, 0, [2, 1]), (0, 1, [1, 1]), (1, 0, [1, 1]),
             (2, 0, [0, 5, 0]), (0, 2, [4, 0, 4]), (3, 1, [1, 2, 3, 0]), (1, 3, [1, 2, 3, 2])]
    lines = [" ".join(["t", str(i), str(j), *map(str, loads)]) for i, j, loads in cases]
    python = [protocol.pick_two(list(range(len(loads))), lambda c, loads=loads: loads[c],
                                sample=lambda _n, i=i, j=j: (i, j)) for i, j, loads in cases]
    assert picking_driver(lines) == python
    assert protocol.pick_two([], lambda c: 0) is None
