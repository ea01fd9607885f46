"""KServe's side of `peer_kserve.py`; runs in the peer venv (kserve and
tensorflow-cpu from PyPI), never imports this project.

    serve    KServe's Python model server (`kserve.ModelServer`) with one
             `SavedModelPredictor` per `--savedmodel NAME=DIR`: V1 REST
             (`/v1/models/NAME:predict`, {"instances": ...}) on --http_port and
             V2 gRPC (`inference.GRPCInferenceService/ModelInfer`) on
             --grpc_port. Other flags are KServe's own (its parser reads them).
    request  writes the serialized V2 ModelInferRequest of --name with the
             float32 input in INPUT.npy (raw tensor contents, as Triton's and
             KServe's clients send them) to OUT.
    check    calls the server once per model over both protocols and compares
             the answers with the SavedModel called in-process.

The model class is the one KServe's documentation shows for a custom
model: `load()` once, a synchronous `predict()` that answers V1 dicts and V2
`InferRequest`s. Both models take "x" and answer "y".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("mode", choices=("serve", "request", "check"))
    parser.add_argument("--savedmodel", action="append", default=[], help="NAME=SAVEDMODEL_DIR (serve, check)")
    parser.add_argument("--name", help="request: the model's name")
    parser.add_argument("--input", help="request: INPUT.npy")
    parser.add_argument("--out", help="request: where the request bytes go")
    parser.add_argument("--inputs-dir", help="check: NAME.npy per model")
    parser.add_argument("--check-rest", help="check: http://host:port")
    parser.add_argument("--check-grpc", help="check: host:port")
    return parser  # no flag a prefix of KServe's (its parser, run at import, takes abbreviations)


def serve(models: dict[str, str]) -> None:
    import kserve
    import tensorflow as tf
    from kserve import InferOutput, InferRequest, InferResponse

    class SavedModelPredictor(kserve.Model):
        def __init__(self, name: str, path: str):
            super().__init__(name)
            self.path = path
            self.fn = None
            self.load()

        def load(self) -> bool:
            self.fn = tf.saved_model.load(self.path).signatures["serving_default"]
            self.ready = True
            return self.ready

        def _run(self, x: np.ndarray) -> np.ndarray:
            return self.fn(x=tf.constant(x))["y"].numpy()

        def predict(self, payload, headers=None, response_headers=None):
            if isinstance(payload, InferRequest):
                y = self._run(payload.inputs[0].as_numpy().astype(np.float32, copy=False))
                out = InferOutput(name="y", shape=list(y.shape), datatype="FP32")
                out.set_data_from_numpy(y, binary_data=True)
                return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[out])
            return {"predictions": self._run(np.asarray(payload["instances"], dtype=np.float32)).tolist()}

    kserve.ModelServer().start([SavedModelPredictor(name, path) for name, path in models.items()])


def infer_request(name: str, x: np.ndarray):
    from kserve import InferInput, InferRequest

    tensor = InferInput(name="x", shape=list(x.shape), datatype="FP32")
    tensor.set_data_from_numpy(x.astype(np.float32), binary_data=True)
    return InferRequest(model_name=name, infer_inputs=[tensor], request_id="1").to_grpc()


def check(models: dict[str, str], inputs_dir: str, rest: str, grpc_address: str) -> None:
    import grpc
    import tensorflow as tf
    from kserve import InferResponse
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as v2

    channel = grpc.insecure_channel(grpc_address)
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=v2.ModelInferRequest.SerializeToString,
                                response_deserializer=v2.ModelInferResponse.FromString)
    for name, path in models.items():
        x = np.load(os.path.join(inputs_dir, f"{name}.npy"))
        expected = tf.saved_model.load(path).signatures["serving_default"](x=tf.constant(x))["y"].numpy()
        body = json.dumps({"instances": x.tolist()}).encode()
        request = urllib.request.Request(f"{rest}/v1/models/{name}:predict", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            got_rest = np.asarray(json.loads(resp.read())["predictions"], dtype=np.float32)
        got_grpc = InferResponse.from_grpc(infer(infer_request(name, x), timeout=30)).outputs[0].as_numpy()
        for what, got in (("REST", got_rest), ("gRPC", got_grpc)):
            if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-5, atol=1e-5):
                raise SystemExit(f"KServe {what} answered {name} wrongly: {got!r} (expected {expected!r})")
    print("ok", flush=True)


def main() -> None:
    args, _ = _parser().parse_known_args()
    models = dict(spec.split("=", 1) for spec in args.savedmodel)
    if args.mode == "serve":
        # KServe parses sys.argv itself (its flags: --http_port, --grpc_port, ...).
        serve(models)
    elif args.mode == "request":
        with open(args.out, "wb") as f:
            f.write(infer_request(args.name, np.load(args.input)).SerializeToString())
    else:
        check(models, args.inputs_dir, args.check_rest, args.check_grpc)


if __name__ == "__main__":
    sys.exit(main())
