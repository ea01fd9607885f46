"""TF dtype enum values and the numeric limits TF Serving's JSON checks use."""
from __future__ import annotations

import struct

from cloudml.tfs.tensorflow.core.framework import types_pb2


DEFAULT_SIGNATURE = "serving_default"

DT = types_pb2.DataType
DT_FLOAT = DT.Value("DT_FLOAT")
DT_DOUBLE = DT.Value("DT_DOUBLE")
DT_INT32 = DT.Value("DT_INT32")
DT_UINT8 = DT.Value("DT_UINT8")
DT_INT16 = DT.Value("DT_INT16")
DT_INT8 = DT.Value("DT_INT8")
DT_STRING = DT.Value("DT_STRING")
DT_INT64 = DT.Value("DT_INT64")
DT_BOOL = DT.Value("DT_BOOL")
DT_BFLOAT16 = DT.Value("DT_BFLOAT16")
DT_UINT16 = DT.Value("DT_UINT16")
DT_HALF = DT.Value("DT_HALF")
DT_UINT32 = DT.Value("DT_UINT32")
DT_UINT64 = DT.Value("DT_UINT64")
DT_COMPLEX64 = DT.Value("DT_COMPLEX64")
DT_COMPLEX128 = DT.Value("DT_COMPLEX128")

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
FLT_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]  # numpy's finfo(float32).max, without numpy
FLOAT_MAX_INT = (1 << 24) - 1   # IsLosslessDecimal<float>: (1 << digits) - 1
DOUBLE_MAX_INT = (1 << 53) - 1
RJ_FLOAT_RANGE = 3.4028234e38   # rapidjson's Value::IsFloat() bound
