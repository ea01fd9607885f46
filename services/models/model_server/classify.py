"""Classify, Regress and MultiInference: tf.Example inputs, TF Serving's checks.

As in TF Serving (`classifier.cc`, `regressor.cc`, `multi_inference.cc`,
`util.cc`) with the method-name check off (its default), a signature serves
Classify when it has exactly one input named `inputs` and one or two outputs
among `classes` (DT_STRING) and `scores` (DT_FLOAT), both [batch, classes];
Regress when it has one input `inputs` and one output `outputs` (DT_FLOAT,
[batch] or [batch, 1]). The input is fed the serialized tf.Examples as a
DT_STRING vector; with `example_list_with_context` each example is the
context's bytes followed by the example's (a proto merge). A signature whose
input is not DT_STRING fails like TF Serving's session does
(`Expects arg[0] to be float but string is provided`).
"""
from __future__ import annotations

import numpy as np

from services.models.model_server import status
from services.models.model_server.servable import Servable, Signature
from services.models.model_server.tensors import DT_STRING, TF_DTYPES, dtype_name

CLASSIFY_INPUTS = "inputs"
CLASSIFY_CLASSES = "classes"
CLASSIFY_SCORES = "scores"
REGRESS_INPUTS = "inputs"
REGRESS_OUTPUTS = "outputs"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
DEFAULT_SIGNATURE = "serving_default"


def examples(input_proto) -> np.ndarray:
    """The request's tf.Examples serialized, as a DT_STRING vector."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        values = [ex.SerializeToString() for ex in input_proto.example_list.examples]
    elif kind == "example_list_with_context":
        with_context = input_proto.example_list_with_context
        context = with_context.context.SerializeToString()
        values = [context + ex.SerializeToString() for ex in with_context.examples]
    else:
        values = []
    if not values:
        raise status.invalid("Input is empty.")
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def _lookup(servable: Servable, signature_name: str) -> Signature:
    name = signature_name or DEFAULT_SIGNATURE
    signature = servable.signatures.get(name)
    if signature is None:
        raise status.invalid(f"No signature was found with the name: {name}")
    return signature


def check_string_input(signature: Signature, alias: str) -> None:
    expected = signature.inputs[alias].dtype
    if expected != DT_STRING:
        raise status.type_mismatch(0, dtype_name(expected), "string")


# --- classification --------------------------------------------------------------------


def classification_signature(servable: Servable, signature_name: str) -> tuple[Signature, tuple[str, ...]]:
    """The signature for a ClassificationRequest and the outputs to fetch."""
    signature = _lookup(servable, signature_name)
    return signature, classification_fetches(signature)


def classification_fetches(signature: Signature) -> tuple[str, ...]:
    if len(signature.inputs) != 1:
        raise status.invalid("Expected one input Tensor.")
    if len(signature.outputs) not in (1, 2):
        raise status.invalid(f"Expected one or two output Tensors, found {len(signature.outputs)}")
    if CLASSIFY_INPUTS not in signature.inputs:
        raise status.invalid(f"No classification inputs found in SignatureDef: {signature.debug_string()}")
    fetches = tuple(a for a in (CLASSIFY_CLASSES, CLASSIFY_SCORES) if a in signature.outputs)
    if not fetches:
        raise status.invalid(
            'Expected classification signature outputs to contain at least one of "classes" or "scores". '
            f"Signature was: {signature.debug_string()}"
        )
    return fetches


def _shape(arr: np.ndarray) -> str:
    return "[" + ",".join(str(d) for d in arr.shape) + "]"


def fill_classification(result, num_examples: int, fetches: tuple[str, ...], outputs: list[np.ndarray]) -> None:
    """Checks the outputs like TF Serving and fills a ClassificationResult."""
    by_alias = dict(zip(fetches, outputs))
    classes = by_alias.get(CLASSIFY_CLASSES)
    scores = by_alias.get(CLASSIFY_SCORES)
    for label, arr, want in (("classes", classes, DT_STRING), ("scores", scores, 1)):
        if arr is None:
            continue
        if arr.ndim != 2:
            raise status.invalid(f"Expected Tensor shape: [batch_size num_classes] but got {_shape(arr)}")
        got = TF_DTYPES.get(arr.dtype, DT_STRING if arr.dtype.kind in "OSU" else -1)
        if got != want:
            raise status.invalid(
                f"Expected {label} Tensor of {'DT_STRING' if want == DT_STRING else 'DT_FLOAT'}. "
                f"Got: DT_{dtype_name(got).upper()}"
            )
        if arr.shape[0] != num_examples:
            raise status.invalid(f"Expected {label} output batch size of {num_examples}. Got: {arr.shape[0]}")
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise status.invalid(
            f"Tensors class and score should match in dim_size(1). Got {classes.shape[1]} vs. {scores.shape[1]}"
        )
    num_classes = (classes if classes is not None else scores).shape[1]
    score_rows = scores.tolist() if scores is not None else None
    for i in range(num_examples):
        classifications = result.classifications.add()
        for c in range(num_classes):
            cls = classifications.classes.add()
            if classes is not None:
                label = classes[i, c]
                cls.label = label.decode("utf-8", "replace") if isinstance(label, bytes) else str(label)
            if score_rows is not None:
                cls.score = score_rows[i][c]


# --- regression ----------------------------------------------------------------------------


def regression_signature(servable: Servable, signature_name: str) -> tuple[Signature, tuple[str, ...]]:
    signature = _lookup(servable, signature_name)
    return signature, regression_fetches(signature)


def regression_fetches(signature: Signature) -> tuple[str, ...]:
    if len(signature.inputs) != 1:
        raise status.invalid("Expected one input Tensor.")
    if len(signature.outputs) != 1:
        raise status.invalid("Expected one output Tensor.")
    if REGRESS_INPUTS not in signature.inputs:
        raise status.invalid(f"No regression inputs found in SignatureDef: {signature.debug_string()}")
    if REGRESS_OUTPUTS not in signature.outputs:
        raise status.invalid(f"No regression outputs found in SignatureDef: {signature.debug_string()}")
    return (REGRESS_OUTPUTS,)


def fill_regression(result, num_examples: int, outputs: list[np.ndarray]) -> None:
    out = outputs[0]
    if not (out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)):
        raise status.invalid(
            f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got {_shape(out)}"
        )
    if out.shape[0] != num_examples:
        raise status.invalid(
            f"Input batch size did not match output batch size: {num_examples} vs. {out.shape[0]}"
        )
    if TF_DTYPES.get(out.dtype) != 1:
        raise status.invalid(f"Expected output Tensor of DT_FLOAT.  Got: DT_{dtype_name(TF_DTYPES.get(out.dtype, 0)).upper()}")
    for value in out.reshape(-1).tolist():
        result.regressions.add(value=value)


# --- multi-inference ----------------------------------------------------------------------


def multi_inference_plan(servable: Servable, request) -> list[tuple]:
    """Per task: (task, signature, method, fetches), after TF Serving's checks."""
    model_name = ""
    input_tensor = None
    seen: set[str] = set()
    plan = []
    for task in request.tasks:
        spec = task.model_spec
        if not spec.name:
            raise status.invalid("Found ModelSpec with an empty model name.")
        if not model_name:
            model_name = spec.name
        elif spec.name != model_name:
            raise status.invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        name = spec.signature_name or DEFAULT_SIGNATURE
        if name in seen:
            raise status.invalid(f"Duplicate evaluation of signature: {name}")
        seen.add(name)
        signature = servable.signatures.get(name)
        if signature is None:
            raise status.invalid(f"Requested signature not found in model graph: {name}")
        if task.method_name == CLASSIFY_METHOD:
            fetches = classification_fetches(signature)
        elif task.method_name == REGRESS_METHOD:
            fetches = regression_fetches(signature)
        else:
            raise status.unimplemented(f"Unsupported signature method_name: {task.method_name}")
        tensor = signature.inputs[CLASSIFY_INPUTS].name
        if input_tensor is None:
            input_tensor = tensor
        elif tensor != input_tensor:
            raise status.invalid("Input tensor must be the same for all Signatures.")
        plan.append((task, signature, task.method_name, fetches))
    return plan
