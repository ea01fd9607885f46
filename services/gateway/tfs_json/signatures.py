"""Signatures: where a request's dtypes come from."""
from __future__ import annotations

from typing import Any, Mapping

from cloudml.tfs.tensorflow.core.protobuf import meta_graph_pb2
from cloudml.tfs.tensorflow_serving.apis import get_model_metadata_pb2

from services.gateway.tfs_json.dtypes import (DEFAULT_SIGNATURE, DT_BOOL, DT_FLOAT, DT_INT32, DT_INT64,
    DT_STRING, INT32_MAX, INT32_MIN)
from services.gateway.tfs_json.errors import JsonError


SignatureSource = Any  # SignatureDef | Mapping[str, SignatureDef] | Callable | ... | None


def signature_def_map(
        response: get_model_metadata_pb2.GetModelMetadataResponse) -> get_model_metadata_pb2.SignatureDefMap:
    """A GetModelMetadataResponse's 'signature_def' Any, unpacked (INTERNAL errors as TF Serving words them)."""
    if "signature_def" not in response.metadata:
        raise JsonError("Failed to find 'signature_def' key in the GetModelMetadataResponse "
                        "metadata map.", "INTERNAL")
    sdm = get_model_metadata_pb2.SignatureDefMap()
    if not response.metadata["signature_def"].Unpack(sdm):
        raise JsonError("Failed to unpack 'Any' object to 'SignatureDefMap'.", "INTERNAL")
    return sdm


def signature_map_from_metadata(
        response: get_model_metadata_pb2.GetModelMetadataResponse) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The signatures in a GetModelMetadataResponse (its 'signature_def' Any)."""
    return dict(signature_def_map(response).signature_def)


def _resolve_signature(source: SignatureSource, name: str) -> meta_graph_pb2.SignatureDef | None:
    """The SignatureDef TF Serving's GetInfoMap would pick, or None to infer."""
    if source is None:
        return None
    if isinstance(source, meta_graph_pb2.SignatureDef):
        return source
    if isinstance(source, get_model_metadata_pb2.GetModelMetadataResponse):
        source = signature_map_from_metadata(source)
    elif isinstance(source, get_model_metadata_pb2.SignatureDefMap):
        source = source.signature_def
    signame = name or DEFAULT_SIGNATURE
    if isinstance(source, Mapping) or hasattr(source, "keys"):
        sig = source[signame] if signame in source else None
    elif callable(source):
        sig = source(signame)
    else:
        raise TypeError(f"unsupported signature source: {type(source).__name__}")
    if sig is None:
        raise JsonError(f'Serving signature name: "{signame}" not found in signature def')
    return sig


def _infer_dtype(val: Any) -> int:
    """dtype for an input when no signature is given (beyond TF Serving)."""
    stack, kinds = [val], set()
    while stack:
        v = stack.pop()
        if type(v) is list:
            stack.extend(v)
        elif type(v) is dict or type(v) is str:
            kinds.add("str")
        elif type(v) is bool:
            kinds.add("bool")
        elif type(v) is int:
            kinds.add("int" if INT32_MIN <= v <= INT32_MAX else "int64")
        elif type(v) is float:
            kinds.add("float")
        else:
            kinds.add("other")
    if "str" in kinds:
        return DT_STRING
    if kinds == {"bool"}:
        return DT_BOOL
    if kinds and kinds <= {"int"}:
        return DT_INT32
    if kinds and kinds <= {"int", "int64"}:
        return DT_INT64
    return DT_FLOAT
