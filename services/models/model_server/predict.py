"""Predict: checking a request against its signature, and the response bytes.

The checks and their order are TF Serving's (`predict_util.cc`,
`saved_model/util.cc`), with the signature method-name check off (TF
Serving's default, `--enable_signature_method_name_check=false`), so Predict
runs predict, classify and regress signatures alike:

1. the signature exists, else FAILED_PRECONDITION
   `Serving signature key "<name>" not found.`;
2. the number of inputs matches (unless the signature has defaults for the
   missing ones), else INVALID_ARGUMENT `input size does not match
   signature: ...`;
3. every signature input is in the request (or has a default) and parses;
   then no request input is left unused;
4. every `output_filter` alias exists, at most once;
5. each input's dtype is the signature's, else INVALID_ARGUMENT
   `Expects arg[i] to be <dtype> but <dtype> is provided` (what the session
   answers in TF Serving).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.models.model_server import status
from services.models.model_server.servable import Servable, Signature, check_dtypes
from services.models.model_server.tensors import (
    TensorParseError,
    TensorTooLarge,
    checked_shape,
    predict_response_bytes,
    tensor_bytes,
    to_ndarray,
)

DEFAULT_SIGNATURE = "serving_default"


@dataclass
class PredictPlan:
    signature: Signature
    #: aliases fed, in the signature's input order, and their arrays
    feeds: tuple[str, ...]
    arrays: list[np.ndarray]
    #: output aliases to return, in response order
    fetches: tuple[str, ...]


def _keys(keys) -> str:
    return ",".join(sorted(keys))


def check_input_sizes(request, max_bytes: int) -> None:
    """INVALID_ARGUMENT `tensor parsing error: <alias>` for an input whose shape
    is malformed or decodes to more than `max_bytes` (checked before decoding:
    a few bytes of `float_val` with a huge shape would otherwise allocate it)."""
    for alias, proto in request.inputs.items():
        try:
            checked_shape(proto, max_bytes)
        except TensorTooLarge as err:
            raise status.invalid(f"tensor parsing error: {alias}: {err}") from None
        except TensorParseError:
            raise status.invalid(f"tensor parsing error: {alias}") from None


def plan(servable: Servable, request) -> PredictPlan:
    """Validates a PredictRequest (whose model_spec already resolved) and decodes its inputs."""
    name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    signature = servable.signatures.get(name)
    if signature is None:
        raise status.failed_precondition(f'Serving signature key "{name}" not found.')
    inputs = request.inputs
    sig_inputs = signature.inputs
    n_req, n_sig = len(inputs), len(sig_inputs)
    if n_req > n_sig or (n_req < n_sig and not signature.defaults):
        req_keys = set(inputs.keys())
        extra = req_keys - set(sig_inputs)
        missing = set(sig_inputs) - req_keys
        raise status.invalid(
            f"input size does not match signature: {n_req}!={n_sig} len({{{_keys(req_keys)}}}) != "
            f"len({{{_keys(sig_inputs)}}}). Sent extra: {{{_keys(extra)}}}. "
            f"Missing but required: {{{_keys(missing)}}}."
        )
    arrays = []
    used = 0
    for alias, spec in sig_inputs.items():
        if alias in inputs:
            proto = inputs[alias]
            used += 1
        else:
            proto = signature.defaults.get(alias)
            if proto is None:
                raise status.invalid(
                    f"Signature input alias: {alias}(feed name: {spec.name}) not found in request and no "
                    f"default value provided. Inputs expected to be in the request {{{_keys(inputs.keys())}}}, "
                    f"or default input alias set: {_keys(signature.defaults)}"
                )
        try:
            arrays.append(to_ndarray(proto))
        except TensorParseError as err:
            raise status.invalid(f"tensor parsing error: {alias}") from err
    if n_req and used != n_req:
        used_keys = [a for a in sig_inputs if a in inputs]
        raise status.invalid(
            f"Inputs contains invalid name. Used request inputs: {_keys(used_keys)}, "
            f"request input: {_keys(inputs.keys())}"
        )
    output_filter = request.output_filter
    if output_filter:
        seen = set()
        for alias in output_filter:
            if alias not in signature.outputs:
                raise status.invalid(
                    f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                    f"{{{_keys(signature.outputs)}}}."
                )
            if alias in seen:
                raise status.invalid(f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        fetches = tuple(output_filter)
    else:
        fetches = signature.output_aliases
    feeds = signature.input_aliases
    check_dtypes(signature, feeds, arrays)
    return PredictPlan(signature, feeds, arrays, fetches)


def response_bytes(plan: PredictPlan, outputs: list[np.ndarray], model_spec: bytes, content: bool) -> bytes:
    """The serialized PredictResponse."""
    return predict_response_bytes(
        [(alias, tensor_bytes(np.asarray(arr), content)) for alias, arr in zip(plan.fetches, outputs)],
        model_spec,
    )
