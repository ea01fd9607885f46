"""The autoscaling rule (services/models/autoscaler.py) on synthetic samples."""
from services.models.autoscaler import Autoscaler


def feed(scaler: Autoscaler, key: str, samples: list[tuple[float, float]]) -> None:
    for now, inflight in samples:
        scaler.observe(key, inflight, now)


def test_wanted_is_ceil_of_inflight_over_target():
    scaler = Autoscaler(target=4)
    assert [scaler.wanted(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_scales_up_at_once_within_bounds():
    scaler = Autoscaler(target=4, scale_down_delay=60)
    feed(scaler, "v", [(0, 0), (1, 17)])
    assert scaler.desired("v", current=1, min_replicas=1, max_replicas=3, now=1) == 3  # clamped to max
    assert scaler.desired("v", current=1, min_replicas=1, max_replicas=10, now=1) == 5


def test_never_below_min_nor_above_max():
    scaler = Autoscaler(target=4, scale_down_delay=0)
    feed(scaler, "v", [(0, 0), (1, 0), (2, 0)])
    assert scaler.desired("v", current=3, min_replicas=2, max_replicas=5, now=2) == 2
    assert scaler.desired("v", current=9, min_replicas=1, max_replicas=4, now=2) <= 4


def test_scales_down_only_after_a_full_quiet_window_to_the_window_peak():
    scaler = Autoscaler(target=4, scale_down_delay=10)
    feed(scaler, "v", [(0, 16)])
    assert scaler.desired("v", 1, 1, 8, now=0) == 4
    # Load drops to 5 in flight (wants 2): nothing happens for 10 s.
    for t in range(1, 10):
        feed(scaler, "v", [(t, 5)])
        assert scaler.desired("v", 4, 1, 8, now=t) == 4
    for t in range(10, 13):
        feed(scaler, "v", [(t, 5)])
    assert scaler.desired("v", 4, 1, 8, now=12) == 2


def test_a_burst_inside_the_window_keeps_the_replicas():
    scaler = Autoscaler(target=4, scale_down_delay=10)
    feed(scaler, "v", [(0, 12)])
    assert scaler.desired("v", 1, 1, 8, now=0) == 3
    feed(scaler, "v", [(t, 0) for t in range(1, 15)] + [(15, 12)] + [(t, 0) for t in range(16, 20)])
    assert scaler.desired("v", 3, 1, 8, now=19) == 3


def test_fixed_bounds_ignore_samples():
    scaler = Autoscaler(target=1)
    feed(scaler, "v", [(0, 100)])
    assert scaler.desired("v", 2, 2, 2, now=0) == 2


def test_no_samples_keeps_the_current_count():
    assert Autoscaler().desired("unknown", 3, 1, 5, now=100) == 3


def test_asking_twice_gives_the_same_answer():
    scaler = Autoscaler(target=4, scale_down_delay=3)
    feed(scaler, "v", [(0, 8)])
    assert scaler.desired("v", 1, 1, 2, now=0) == 2
    feed(scaler, "v", [(1, 0)])
    assert scaler.desired("v", 2, 1, 2, now=1) == 2  # the new count is in force from t=1
    feed(scaler, "v", [(t, 0) for t in range(2, 8)])
    first = scaler.desired("v", 2, 1, 2, now=7)
    assert first == scaler.desired("v", 2, 1, 2, now=7) == 1


def test_scrape_unix_reads_a_replica_metrics_socket(tmp_path):
    """The scrape speaks to the model server's real metrics endpoint (the
    prometheus handler on a Unix socket): whole body, status checked, size capped."""
    import asyncio

    from prometheus_client import CollectorRegistry, Gauge

    from services.models.autoscaler import scrape_unix
    from services.models.model_server.metrics import serve_metrics

    registry = CollectorRegistry()
    gauge = Gauge("cloudml_model_server_inflight_requests", "in flight", registry=registry)
    gauge.set(3)
    for i in range(400):  # a body larger than one socket read
        Gauge(f"padding_{i}", "x" * 100, registry=registry).set(i)
    path = str(tmp_path / "m.sock")
    serve_metrics(f"unix:{path}", registry)
    text = asyncio.run(scrape_unix(path, 1 << 20))
    assert "cloudml_model_server_inflight_requests 3.0" in text and "padding_399 399.0" in text
    assert len(asyncio.run(scrape_unix(path, 1000))) == 1000


def test_scrape_of_a_hostile_replica_gives_up_bounded(tmp_path):
    """A replica runs tenant code, so its metrics socket may answer anything:
    endless headers, another status, an endless body, nothing at all. The
    scrape ends each within its caps (64 KiB of headers, `limit` of body, the
    scrape's timeout) with an error the scraper counts as no sample."""
    import asyncio

    from services.models.autoscaler import scrape_unix

    answers = {
        "headers": b"HTTP/1.0 200 OK\r\nX: " + b"a" * (1 << 20),
        "status": b"HTTP/1.0 500 Oops\r\n\r\nbody",
        "body": b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * (4 << 20),
        "silent": None,
    }

    async def run(kind: str):
        path = str(tmp_path / f"{kind}.sock")

        async def answer(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            if answers[kind] is None:
                await asyncio.sleep(30)
            else:
                writer.write(answers[kind])
                await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(answer, path=path)
        try:
            return await asyncio.wait_for(scrape_unix(path, 1 << 16), 2.0)
        except Exception as err:  # noqa: BLE001 - the test looks at which
            return err
        finally:
            server.close()

    outcomes = {kind: asyncio.run(run(kind)) for kind in answers}
    assert isinstance(outcomes["headers"], (asyncio.LimitOverrunError, ValueError)), outcomes
    assert isinstance(outcomes["status"], ValueError), outcomes
    assert isinstance(outcomes["body"], str) and len(outcomes["body"]) == 1 << 16, len(outcomes["body"])
    assert isinstance(outcomes["silent"], asyncio.TimeoutError), outcomes
