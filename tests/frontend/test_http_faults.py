"""Faults seen through the HTTP API (issue 6): a killed GPU worker and a client that goes away.

A SIGKILLed GPU worker turns every request, in flight or new, into a 503 in OpenAI's error shape
(a stream that had begun ends with the error as its last event), and /health answers 503. A
client that hangs up on a non-streamed request has that request aborted in the GPU worker.
Each test starts its own real server on a tiny model: the first one kills it.
"""

import http.client
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from mm_testing import RunningServer, assert_openai_error, http_post

from mm_runtime.frontend.http_api import HttpServer

LONG = {"max_tokens": 100_000, "temperature": 0, "ignore_eos": True}  # runs until stopped
TEXT = [{"role": "user", "content": "Go on and on."}]


@pytest.fixture
def served(tiny_models: dict[str, Path], start_http: Callable) -> tuple:
    return start_http(tiny_models["qwen2_vl"])


def poll(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def in_flight(server: RunningServer) -> int:
    return int(server.stats()["frontend_requests_in_flight"])


def post_chat(http_server: HttpServer, model: str, stream: bool = False) -> tuple[int, dict]:
    body = json.dumps({"model": model, "messages": TEXT, "stream": stream, **LONG}).encode()
    return http_post(f"{http_server.address}/v1/chat/completions", body)


def health(http_server: HttpServer) -> int:
    try:
        with urllib.request.urlopen(f"{http_server.address}/health", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def assert_engine_dead(status: int, body: dict) -> None:
    assert status == 503, body
    assert assert_openai_error(body, "engine_dead")["type"] == "server_error"


def test_killed_gpu_worker_gives_503(served: tuple) -> None:
    server, http_server = served
    model = server.frontend.config.model_name
    assert health(http_server) == 200
    client = openai.OpenAI(base_url=f"{http_server.address}/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model=model,
        messages=TEXT,
        stream=True,
        max_tokens=LONG["max_tokens"],
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))  # the stream has begun: a 200 already
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(post_chat, http_server, model)  # in flight, not streamed
        poll(lambda: in_flight(server) == 2, "both requests to be in flight")
        os.kill(server.frontend.gpu_process.pid, signal.SIGKILL)
        assert_engine_dead(*whole.result(60))
    with pytest.raises(openai.APIError) as err:  # the SDK raises the stream's error event
        for _ in stream:
            pass
    assert err.value.code == "engine_dead"

    assert_engine_dead(*post_chat(http_server, model))  # new requests: refused, not hung
    assert_engine_dead(*post_chat(http_server, model, stream=True))
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=model, prompt="Hi", max_tokens=2)
    assert err.value.status_code == 503
    assert health(http_server) == 503
    assert server.frontend.requests == {}


def test_client_disconnect_aborts_whole_request(served: tuple) -> None:
    server, http_server = served
    before = server.stats()["mm_runtime_requests_aborted_total"]
    host, port = http_server.address.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": server.frontend.config.model_name, "messages": TEXT, **LONG}
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    poll(lambda: in_flight(server) == 1, "the request to be in flight")
    connection.close()  # hang up without reading the response
    poll(lambda: in_flight(server) == 0, "the request to be aborted")
    assert server.stats()["mm_runtime_requests_aborted_total"] == before + 1
    assert server.frontend.requests == {} and server.frontend.num_unfinished == 0
    assert health(http_server) == 200
