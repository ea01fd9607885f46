"""Model status and metadata responses as TF Serving prints them."""
from __future__ import annotations

import json
from typing import Any

from cloudml.tfs.tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2
from cloudml.tfs.xla.tsl.protobuf import error_codes_pb2

from services.gateway.tfs_json.signatures import signature_def_map
from services.gateway.tfs_json.strings import _encode_out


def _enum_name(enum: Any, value: int) -> Any:
    try:
        return enum.Name(value)
    except ValueError:
        return value


def model_status_to_json(response: get_model_status_pb2.GetModelStatusResponse) -> bytes:
    """GetModelStatusResponse as TF Serving prints it (protobuf JSON, all
    fields, one-space indent)."""
    state_enum = get_model_status_pb2.ModelVersionStatus.State
    out = []
    for s in response.model_version_status:
        entry: dict[str, Any] = {"version": str(s.version), "state": _enum_name(state_enum, s.state)}
        if s.HasField("status"):
            entry["status"] = {"error_code": _enum_name(error_codes_pb2.Code, s.status.error_code),
                               "error_message": s.status.error_message}
        out.append(entry)
    return _encode_out(json.dumps({"model_version_status": out}, indent=1, ensure_ascii=False) + "\n")


def model_metadata_to_json(response: get_model_metadata_pb2.GetModelMetadataResponse) -> bytes:
    """GetModelMetadataResponse as TF Serving prints it:
    {"model_spec": {...}, "metadata": {"signature_def": <SignatureDefMap>}}."""
    from google.protobuf import json_format

    sdm = signature_def_map(response)
    opts = dict(preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    sigs = json_format.MessageToDict(sdm, **opts)
    # Protobuf maps have no order (a replica's bytes list them as its hash map
    # iterates): signatures and their inputs and outputs are sorted by name,
    # so that one model answers the same bytes through any gateway.
    sigs["signature_def"] = {
        name: {**sig, **{io: dict(sorted(sig[io].items())) for io in ("inputs", "outputs") if io in sig}}
        for name, sig in sorted(sigs.get("signature_def", {}).items())}
    doc = {
        "model_spec": json_format.MessageToDict(response.model_spec, **opts),
        "metadata": {"signature_def": sigs},
    }
    return _encode_out(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
