"""Metric lines, series merging and the TensorBoard event-file reader, with
event files encoded by hand (protobuf wire format + TFRecord framing), so no
TensorFlow is needed."""
from __future__ import annotations

import json
import struct

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.jobs.metrics import TensorBoardReader, merge_series, parse_event, parse_line, read_event_file


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, wire: int, payload: bytes) -> bytes:
    key = varint(number << 3 | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def event(step: int, wall: float, values: list[bytes]) -> bytes:
    summary = b"".join(field(1, 2, v) for v in values)
    return field(1, 1, struct.pack("<d", wall)) + field(2, 0, varint(step)) + field(5, 2, summary)


def simple_value(tag: str, value: float) -> bytes:  # TF1: Summary.Value.simple_value
    return field(1, 2, tag.encode()) + field(2, 5, struct.pack("<f", value))


def tensor_value(tag: str, value: float, packed: bool = True) -> bytes:  # TF2: tf.summary.scalar
    if packed:
        tensor = field(1, 0, varint(1)) + field(5, 2, struct.pack("<f", value))
    else:
        tensor = field(1, 0, varint(1)) + field(4, 2, struct.pack("<f", value))
    metadata = field(1, 2, field(1, 2, b"scalars"))
    return field(1, 2, tag.encode()) + field(9, 2, metadata) + field(8, 2, tensor)


def record(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + b"\0" * 4 + data + b"\0" * 4


def test_parse_event_reads_tf1_and_tf2_scalars():
    raw = event(7, 1700000000.5, [simple_value("old", 1.5), tensor_value("loss", 0.25),
                                   tensor_value("acc", 0.75, packed=False)])
    scalars = {s.tag: s for s in parse_event(raw)}
    assert scalars["old"].value == 1.5 and scalars["old"].step == 7
    assert scalars["loss"].value == 0.25 and scalars["acc"].value == 0.75
    assert scalars["loss"].wall_time == 1700000000.5


def test_non_scalar_tensors_are_skipped():
    image_like = field(1, 2, b"img") + field(8, 2, field(1, 0, varint(7)) + field(4, 2, b"\x89PNG...."))
    assert parse_event(event(1, 1.0, [image_like])) == []


def test_truncated_tail_is_ignored(tmp_path):
    data = record(event(0, 1.0, [simple_value("loss", 3.0)])) + record(event(1, 2.0, [simple_value("loss", 2.0)]))
    assert [s.value for s in read_event_file(data)] == [3.0, 2.0]
    assert [s.value for s in read_event_file(data[:-7])] == [3.0]  # a file being written


def test_tensorboard_reader_names_series_by_run_and_tag(tmp_path):
    (tmp_path / "tensorboard" / "train").mkdir(parents=True)
    events = b"".join(record(event(i, 1000.0 + i, [tensor_value("loss", 1.0 / (i + 1))])) for i in range(5))
    (tmp_path / "tensorboard" / "train" / "events.out.tfevents.1.host").write_bytes(events)
    (tmp_path / "events.out.tfevents.2.host").write_bytes(record(event(3, 5.0, [simple_value("lr", 0.1)])))
    reader = TensorBoardReader()
    series = {s.name: s for s in reader.series(str(tmp_path), set(), 0)}
    assert set(series) == {"tensorboard/train/loss", "lr"}
    assert [p.step for p in series["tensorboard/train/loss"].points] == [0, 1, 2, 3, 4]
    assert series["lr"].source == pb.METRIC_SOURCE_TENSORBOARD
    assert [p.step for p in reader.series(str(tmp_path), {"tensorboard/train/loss"}, 3)[0].points] == [3, 4]


def test_parse_line_as_cloudml_report_writes_it():
    line = json.dumps({"step": 3, "metrics": {"loss": 0.25, "acc": 0.5}, "time": 1700000000.0,
                       "replica": "worker-1", "attempt": 2}).encode()
    points = dict(parse_line(line, attempt=2))
    assert points["loss"].step == 3 and points["loss"].value == 0.25 and points["loss"].attempt == 2
    assert parse_line(b"not json", 1) == [] and parse_line(b'{"step": -1, "metrics": {"a": 1}}', 1) == []


def test_merge_keeps_the_last_value_per_attempt_and_step_in_order():
    replica = pb.ReplicaId(type=pb.REPLICA_TYPE_WORKER, index=1)

    def chunk(points):
        return pb.MetricSeries(name="loss", replica=replica, source=pb.METRIC_SOURCE_REPORTED,
                               points=[pb.MetricPoint(attempt=a, step=s, value=v) for a, s, v in points])

    merged = merge_series([chunk([(2, 0, 9.0), (1, 1, 1.0)]), chunk([(1, 0, 2.0), (1, 1, 1.5)])], set(), 0)
    (series,) = merged
    assert [(p.attempt, p.step, p.value) for p in series.points] == [(1, 0, 2.0), (1, 1, 1.5), (2, 0, 9.0)]
    assert merge_series([chunk([(1, 0, 1.0)])], {"other"}, 0) == []
