"""Predict requests: row and columnar formats -> PredictRequest."""
from __future__ import annotations

from typing import Any, NamedTuple

from cloudml.tfs.tensorflow.core.framework import tensor_pb2
from cloudml.tfs.tensorflow_serving.apis import predict_pb2

from services.gateway.tfs_json.dtypes import DEFAULT_SIGNATURE
from services.gateway.tfs_json.errors import JsonError
from services.gateway.tfs_json.parse import _is_b64_object, _parse_json
from services.gateway.tfs_json.signatures import _infer_dtype, _resolve_signature, SignatureSource
from services.gateway.tfs_json.text import _shape_str, _vts
from services.gateway.tfs_json.values import (_fast_leaves, _fast_values, _fill_slow, _make_tensor,
    _tensor_values)


class ParsedPredict(NamedTuple):
    request: predict_pb2.PredictRequest
    row_format: bool  # True: "instances" -> answer with "predictions"


def fill_model_spec(spec: Any, model_name: str = "", version: int | None = None,
                    version_label: str | None = None) -> None:
    """http_rest_api_util.cc FillModelSpecWithNameVersionAndLabel."""
    if version is not None and version_label is not None:
        raise JsonError(f"Both model version ({version}) and model version label "
                        f"({version_label}) cannot be supplied.")
    spec.name = model_name
    if version is not None:
        spec.version.value = int(version)
    if version_label is not None:
        spec.version_label = version_label


def _fill_signature_name(doc: dict, spec: Any) -> str:
    if "signature_name" in doc:
        name = doc["signature_name"]
        if type(name) is not str:
            raise JsonError(f"JSON Value: {_vts(doc)} not formatted correctly. "
                            "'signature_name' key must be a string value.")
        spec.signature_name = name
        return name
    return ""


def _format_error(doc: Any, message: str) -> JsonError:
    return JsonError(f"JSON Value: {_vts(doc)} {message}")


def load_request_json(body: bytes | str) -> tuple[dict, str]:
    """First step of a REST predict, before any model lookup (TF Serving
    reports these errors first): parse the body and check "signature_name".

    Returns (doc, signature name the body asks for, "serving_default" when
    none). Pass `doc` as the body of parse_predict_request once the
    signatures are at hand; it is not parsed again."""
    doc = _parse_json(body)
    name = _fill_signature_name(doc, _Spec())
    return doc, name or DEFAULT_SIGNATURE


class _Spec:
    signature_name = ""


def parse_predict_request(body: bytes | str | dict, signature: SignatureSource, *,
                          model_name: str = "", version: int | None = None,
                          version_label: str | None = None) -> ParsedPredict:
    """A REST predict body -> (PredictRequest, row_format).

    `signature` tells the dtypes of the inputs, as TF Serving reads them from
    the loaded model: a mapping of signature name -> SignatureDef (e.g.
    `signature_map_from_metadata(metadata_response)`, or the response itself,
    or a SignatureDefMap), or a callable(name) -> SignatureDef | None; the
    body's "signature_name" (default "serving_default") picks the entry. A
    single SignatureDef is used whatever the body names. None infers dtypes
    from the JSON values (named inputs only; not TF Serving behaviour).
    `body` may also be the doc returned by load_request_json.
    """
    doc = _parse_json(body)
    request = predict_pb2.PredictRequest()
    fill_model_spec(request.model_spec, model_name, version, version_label)
    signame = _fill_signature_name(doc, request.model_spec)
    sig = _resolve_signature(signature, signame)
    infomap = None if sig is None else {k: v.dtype for k, v in sig.inputs.items()}
    if infomap is not None and not infomap:
        raise JsonError(f"Failed to get input map for signature: {signame or 'DEFAULT'}")

    if "instances" in doc:
        if "inputs" in doc:
            raise _format_error(doc, "Not formatted correctly expecting only one of 'inputs' or "
                                     "'instances' keys to exist ")
        instances = doc["instances"]
        if type(instances) is not list:
            raise _format_error(doc, "Excepting 'instances' to be an list/array")
        if not instances:
            raise _format_error(doc, "No values in 'instances' array")
        if infomap is None:
            infomap = _infer_row_infomap(instances, signame)
        tensors = _row_tensors(instances, infomap)
        row = True
    elif "inputs" in doc:
        inputs = doc["inputs"]
        if infomap is None:
            infomap = _infer_columnar_infomap(inputs, signame)
        tensors = _columnar_tensors(inputs, infomap)
        row = False
    else:
        raise JsonError("Missing 'inputs' or 'instances' key")
    for name, tensor in tensors.items():
        request.inputs[name].CopyFrom(tensor)
    return ParsedPredict(request, row)


def predict_request_from_json(body: bytes | str | dict, signature: SignatureSource, *,
                              model_name: str = "", version: int | None = None,
                              version_label: str | None = None) -> predict_pb2.PredictRequest:
    """Like parse_predict_request, without the format flag."""
    return parse_predict_request(body, signature, model_name=model_name, version=version,
                                 version_label=version_label).request


def _infer_row_infomap(instances: list, signame: str) -> dict[str, int]:
    first = instances[0]
    if type(first) is not dict or _is_b64_object(first):
        raise JsonError(f"Failed to get input map for signature: {signame or 'DEFAULT'}")
    return {name: _infer_dtype([e.get(name) for e in instances if type(e) is dict and name in e])
            for name in first}


def _infer_columnar_infomap(inputs: Any, signame: str) -> dict[str, int]:
    if type(inputs) is not dict or _is_b64_object(inputs) or not inputs:
        raise JsonError(f"Failed to get input map for signature: {signame or 'DEFAULT'}")
    return {name: _infer_dtype(v) for name, v in inputs.items()}


def _is_element_object(v: Any) -> bool:
    return type(v) is dict and not _is_b64_object(v)


def _row_tensors(instances: list, infomap: dict[str, int]) -> dict[str, tensor_pb2.TensorProto]:
    """json_tensor.cc FillTensorMapFromInstancesList."""
    if type(instances[0]) is not dict and len(infomap) > 1:
        raise JsonError("instances is a plain list, but expecting list of objects as multiple "
                        "input tensors required as per tensorinfo_map")
    objects = _is_element_object(instances[0])
    names = set(infomap)
    n = len(instances)
    # Fast path: regular data converted in bulk; anything else is redone
    # element by element below, which yields TF Serving's exact error.
    if objects:
        if all(_is_element_object(e) and e.keys() == names for e in instances):
            out = {}
            for name in sorted(names):
                col = [e[name] for e in instances]
                fast = _fast_leaves(col)
                conv = _fast_values(fast[1], infomap[name]) if fast is not None else None
                if conv is None:
                    break
                out[name] = _make_tensor(infomap[name], fast[0], conv)
            else:
                return out
    elif not any(_is_element_object(e) for e in instances):
        name = min(infomap)
        fast = _fast_leaves(instances)
        if fast is not None:
            conv = _fast_values(fast[1], infomap[name])
            if conv is not None:
                return {name: _make_tensor(infomap[name], fast[0], conv)}

    sizes: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    values: dict[str, list] = {}

    def add_item(item: Any, name: str) -> None:
        if name not in infomap:
            raise JsonError(f"JSON object: does not have named input: {name}")
        shape, vals = _fill_slow(item, infomap[name])
        if name not in sizes:
            sizes[name] = len(vals)
            shapes[name] = shape
        elif sizes[name] != len(vals):
            raise JsonError(f"Expecting tensor size: {sizes[name]} but got: {len(vals)}")
        elif shapes[name] != shape:
            raise JsonError(f"Expecting shape {_shape_str(shapes[name])} but got: {_shape_str(shape)}")
        values.setdefault(name, []).extend(vals)

    for i, elem in enumerate(instances):
        if objects:
            if not _is_element_object(elem):
                raise JsonError(f"Expecting object but got list at item {i} of input list")
            for name, item in elem.items():
                try:
                    add_item(item, name)
                except JsonError as e:
                    raise JsonError(f"Failed to process element: {i} key: {name} of 'instances' "
                                    f"list. Error: {e.status_string()}") from None
            if set(elem) != names:
                raise JsonError(f"Failed to process element: {i} of 'instances' list. JSON object: "
                                f"{_vts(elem)} keys must be equal to: {','.join(sorted(names))}")
        else:
            if _is_element_object(elem):
                raise JsonError(f"Expecting value/list but got object at item {i} of input list")
            try:
                add_item(elem, min(infomap))
            except JsonError as e:
                raise JsonError(f"Failed to process element: {i} of 'instances' list. "
                                f"Error: {e.status_string()}") from None
    return {name: _make_tensor(infomap[name], [n] + shapes[name], vals)
            for name, vals in values.items()}


def _columnar_tensors(inputs: Any, infomap: dict[str, int]) -> dict[str, tensor_pb2.TensorProto]:
    """json_tensor.cc FillTensorMapFromInputsMap."""
    if type(inputs) is not dict or _is_b64_object(inputs):
        if len(infomap) > 1:
            raise JsonError("inputs is a plain value/list, but expecting an object as multiple "
                            "input tensors required as per tensorinfo_map")
        name = next(iter(infomap))
        shape, vals = _tensor_values(inputs, infomap[name])
        return {name: _make_tensor(infomap[name], shape, vals)}
    out = {}
    for name in sorted(infomap):
        if name not in inputs:
            raise JsonError(f"Missing named input: {name} in 'inputs' object.")
        shape, vals = _tensor_values(inputs[name], infomap[name])
        out[name] = _make_tensor(infomap[name], shape, vals)
    return out
