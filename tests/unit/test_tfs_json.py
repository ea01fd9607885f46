"""services/gateway/tfs_json/: TF Serving's REST JSON without TensorFlow; the
package as a whole (errors and their HTTP status, no TensorFlow imported).

One test module per part of the codec: test_tfs_json_predict_request.py,
test_tfs_json_predict_response.py, test_tfs_json_classify.py,
test_tfs_json_model_status.py (helpers in tfs_json_helpers.py).
tests/conformance/test_tfs_json_vs_tensorflow.py checks the codec against
real TensorFlow in a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys

from services.gateway import tfs_json as tj

from tests.unit.tfs_json_helpers import loads

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------
# Errors and HTTP status
# ---------------------------------------------------------------------------

def test_http_status_for_grpc():
    expected = {"OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400,
                "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
                "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400,
                "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
                "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401}
    for name, status in expected.items():
        assert tj.http_status_for_grpc(name) == status
        assert tj.http_status_for_grpc(name.lower()) == status
        assert tj.http_status_for_grpc("StatusCode." + name) == status
    assert tj.http_status_for_grpc(5) == 404
    assert tj.http_status_for_grpc("WHATEVER") == 500
    import grpc
    assert tj.http_status_for_grpc(grpc.StatusCode.NOT_FOUND) == 404
    assert tj.http_status_for_grpc(grpc.StatusCode.UNAVAILABLE) == 503


def test_error_json_layout():
    assert tj.error_json('Servable not found for request: Latest(half)') == (
        b'{\n    "error": "Servable not found for request: Latest(half)"\n}')
    e = tj.JsonError('a "quoted"\nline')
    assert loads(e.to_json()) == {"error": 'a "quoted"\nline'}
    assert isinstance(e, ValueError) and str(e) == 'a "quoted"\nline'


def test_module_does_not_import_tensorflow():
    code = ("import sys; import services.gateway.tfs_json as m; "
            "bad = [k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'tensorflow_serving')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
