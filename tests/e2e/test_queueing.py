"""Queue limits and timeouts, and cancelling the requests of clients that went away."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.server import RemoteServer
from tests.models import slow_model, write_model

SLOW = slow_model(size=1024, repeats=2)  # ~40-80 ms a batch on one thread, any batch size


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    repo = tmp_path_factory.mktemp("queueing") / "repo"
    one_at_a_time = {
        "platform": "onnxruntime_onnx",
        "max_batch_size": 1,
        # one intra-op thread: a batch costs about as long on a 16-core host as on 2 cores
        "parameters": {"intra_op_thread_count": {"string_value": "1"}},
    }
    write_model(
        repo,
        "slow_full",
        SLOW,
        model_config={
            **one_at_a_time,
            "dynamic_batching": {"default_queue_policy": {"max_queue_size": 2}},
        },
    )
    write_model(
        repo,
        "slow_timeout",
        SLOW,
        model_config={
            **one_at_a_time,
            "dynamic_batching": {"default_queue_policy": {"allow_timeout_override": True}},
        },
    )
    write_model(repo, "slow_cancel", SLOW, model_config={**one_at_a_time, "dynamic_batching": {}})
    with RemoteServer(repo) as server:
        yield server


def _body(timeout_us: int | None = None) -> dict:
    body: dict = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}]}
    if timeout_us is not None:
        body["parameters"] = {"timeout": timeout_us}
    return body


def _burst(url: str, count: int, body: dict) -> list[httpx.Response]:
    with httpx.Client(timeout=60.0) as client, ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: client.post(url, json=body), range(count)))


def _stats(server: RemoteServer, name: str) -> dict:
    return httpx.get(f"{server.url}/v2/models/{name}/stats").json()["model_stats"][0]


def test_queue_full_is_503_with_retry_after(server: RemoteServer) -> None:
    responses = _burst(f"{server.url}/v2/models/slow_full/infer", 12, _body())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes
    full = [r for r in responses if r.status_code == 503]
    assert full, codes
    assert "max_queue_size 2" in full[0].json()["error"]
    assert full[0].headers["retry-after"] == "1"
    assert set(codes) == {200, 503}
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'reason="queue_full"' in metrics


def test_queue_timeout_is_504(server: RemoteServer) -> None:
    responses = _burst(f"{server.url}/v2/models/slow_timeout/infer", 6, _body(timeout_us=5_000))
    codes = sorted(r.status_code for r in responses)
    assert 504 in codes, codes
    assert set(codes) <= {200, 504}
    timed_out = next(r for r in responses if r.status_code == 504)
    assert "timed out" in timed_out.json()["error"]
    stats = _stats(server, "slow_timeout")
    assert stats["inference_stats"]["fail"]["count"] == codes.count(504)


def test_disconnected_client_is_not_computed(server: RemoteServer) -> None:
    url = f"{server.url}/v2/models/slow_cancel/infer"
    before = _stats(server, "slow_cancel")["execution_count"]
    with ThreadPoolExecutor(2) as pool:
        # five 40-80 ms batches keep the only instance busy (200-400 ms) for well over the time the
        # four impatient clients (20 ms each) take to queue up behind it and leave, so none of
        # them should reach the engine; one is tolerated for scheduling jitter on a loaded
        # machine (three busy batches, ~120 ms, let 2 through once at load ~3)
        busy = [pool.submit(_burst, url, 5, _body())]
        time.sleep(0.03)
        with httpx.Client(timeout=0.02) as impatient:
            for _ in range(4):
                with pytest.raises(httpx.TimeoutException):
                    impatient.post(url, json=_body())
        done = busy[0].result()
    assert [r.status_code for r in done] == [200] * 5
    time.sleep(0.3)
    executed = _stats(server, "slow_cancel")["execution_count"] - before
    assert executed <= 6, f"{executed - 5} requests of clients that disconnected were computed"
