"""Warmup: replaying `assets.extra/tf_serving_warmup_requests` before serving.

As TF Serving (`saved_model_warmup_util.cc`): the file is optional; it is a
TFRecord file of `tensorflow.serving.PredictionLog` records (predict,
classify, regress or multi-inference logs); each record is replayed
`iterations` times (default 1) against the loaded model, ignoring the
record's model name and version; at most 1000 records; any failure (an
unparsable record, a request the model refuses) fails the load.
"""
from __future__ import annotations

import logging
import os
import time

import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from services.models.model_server import status
from services.models.model_server.core import ServedModel, run_prediction_log

log = logging.getLogger(__name__)

ASSETS_EXTRA = "assets.extra"
REQUESTS_FILE = "tf_serving_warmup_requests"
MAX_RECORDS = 1000


class WarmupError(Exception):
    """Warmup failed; `code` is the gRPC status code number of the cause."""

    def __init__(self, message: str, code: int = 3):
        super().__init__(message)
        self.message = message
        self.code = code


def warmup_path(model_dir: str) -> str:
    return os.path.join(model_dir, ASSETS_EXTRA, REQUESTS_FILE)


def read_records(path: str) -> list[bytes]:
    """The file's records (blocking; run it off the event loop)."""
    records = []
    try:
        for record in tf.data.TFRecordDataset(path):
            records.append(record.numpy())
            if len(records) > MAX_RECORDS:
                raise WarmupError(f"Number of warmup records exceeds the maximum ({MAX_RECORDS}) at {path}")
    except tf.errors.DataLossError as err:
        raise WarmupError(f"{err.message}. Please verify your warmup data is in TFRecord format.",
                          err.error_code) from err
    except tf.errors.OpError as err:
        raise WarmupError(err.message, err.error_code) from err
    return records


async def run_warmup(model: ServedModel, model_dir: str, iterations: int = 1) -> int:
    """Replays the warmup file if there is one; returns the records replayed."""
    path = warmup_path(model_dir)
    if not os.path.exists(path):
        log.info("No warmup data file found at %s", path)
        return 0
    start = time.perf_counter()
    log.info("Starting to read warmup data for model at %s", path)
    records = await model.executor.run(read_records, path)
    for record in records:
        entry = prediction_log_pb2.PredictionLog()
        try:
            entry.ParseFromString(record)
        except Exception as err:  # noqa: BLE001 - DecodeError and friends
            raise WarmupError(f"Failed to parse warmup record from {path}") from err
        for _ in range(iterations):
            try:
                await run_prediction_log(model, entry)
            except Exception as err:  # noqa: BLE001 - report what the model said
                message = getattr(err, "message", None) or str(err)
                code = err.code.value[0] if isinstance(err, status.ServingError) else 2
                raise WarmupError(f"warmup request failed: {message}", code) from err
        if model.metrics is not None:
            model.metrics.warmup_requests.inc()
    log.info(
        "Finished reading warmup data for model at %s. Number of warmup records read: %d. "
        "Elapsed time (microseconds): %d.", path, len(records), (time.perf_counter() - start) * 1e6,
    )
    return len(records)
