"""The HTTP API's guards (issue 6): API key, body size cap, the waiting-requests cap (429) and
http(s) image URLs from allowed hosts only. Each refusal comes in OpenAI's error shape, and the
next valid request still succeeds. One real server on one tiny model, configured tight.
"""

import base64
import http.client
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from mm_testing import RunningServer, assert_openai_error, free_port, http_post, random_image

from mm_runtime.frontend.http_api import HttpServer
from mm_runtime.frontend.sdk import media_bytes

API_KEY = "sekret-key"
MAX_WAITING = 2
MAX_BODY_MB = 0.05  # about 52 KB: room for a small image's data URL
GREEDY = {"max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
TEXT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def guarded(tiny_models: dict[str, Path]):  # noqa: ANN201
    server = RunningServer(
        tiny_models["qwen2_vl"],
        api_key=API_KEY,
        max_waiting_requests=MAX_WAITING,
        max_request_body_mb=MAX_BODY_MB,
        allowed_media_domains=("127.0.0.1",),
        media_fetch_timeout_s=5.0,
    )
    http_server = HttpServer(server.frontend, "127.0.0.1", free_port())
    try:
        server.call(http_server.start())
        yield server, http_server
    finally:
        server.call(http_server.stop())
        server.close()


def client_for(http_server: HttpServer, api_key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http_server.address}/v1", api_key=api_key, max_retries=0)


def still_serves(server: RunningServer, http_server: HttpServer) -> None:
    model = server.frontend.config.model_name
    out = client_for(http_server).chat.completions.create(model=model, messages=TEXT, **GREEDY)
    assert out.usage.completion_tokens == GREEDY["max_tokens"]


def test_api_key(guarded: tuple) -> None:
    server, http_server = guarded
    model = server.frontend.config.model_name
    url = f"{http_server.address}/v1/chat/completions"
    body = json.dumps({"messages": TEXT, "max_tokens": 2}).encode()
    for headers in ({}, {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"}):
        status, answer = http_post(url, body, {"Content-Type": "application/json", **headers})
        assert status == 401
        assert_openai_error(answer, "invalid_api_key")
    for key in ("wrong-key", API_KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as err:
            client_for(http_server, key).chat.completions.create(
                model=model, messages=TEXT, max_tokens=2
            )
        error = assert_openai_error(err.value.response.json(), "invalid_api_key")
        assert error["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        client_for(http_server, "wrong-key").models.list()
    # Probes and scrapers need no key.
    for path in ("/health", "/metrics"):
        with urllib.request.urlopen(f"{http_server.address}{path}") as response:
            assert response.status == 200
    assert [m.id for m in client_for(http_server).models.list().data] == [model]
    still_serves(server, http_server)


def test_body_too_large(guarded: tuple) -> None:
    server, http_server = guarded
    url = f"{http_server.address}/v1/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    filler = "x" * int(MAX_BODY_MB * 2**20)
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": filler}]})
    status, body = http_post(url, big.encode(), headers)  # declared Content-Length: refused unread
    assert status == 413
    assert "max_request_body_mb" in assert_openai_error(body, "request_too_large")["message"]

    # No Content-Length (chunked): counted as it arrives, refused once past the cap.
    connection = http.client.HTTPConnection("127.0.0.1", int(http_server.address.split(":")[-1]))
    chunks = (big[i : i + 8192].encode() for i in range(0, len(big), 8192))
    connection.request(
        "POST", "/v1/chat/completions", body=chunks, headers=headers, encode_chunked=True
    )
    response = connection.getresponse()
    assert response.status == 413
    assert_openai_error(json.loads(response.read()), "request_too_large")
    connection.close()

    small = json.dumps({"messages": TEXT, "max_tokens": 2, "ignore_eos": True}).encode()
    assert http_post(url, small, headers)[0] == 200
    still_serves(server, http_server)


def test_too_many_requests(guarded: tuple) -> None:
    server, http_server = guarded
    client = client_for(http_server)
    model = server.frontend.config.model_name
    long_run = {"max_tokens": 100_000, "temperature": 0, "extra_body": {"ignore_eos": True}}
    streams = [
        client.chat.completions.create(model=model, messages=TEXT, stream=True, **long_run)
        for _ in range(MAX_WAITING)
    ]
    for stream in streams:
        next(iter(stream))  # both are generating
    for stream_flag in (False, True):
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(
                model=model, messages=TEXT, stream=stream_flag, max_tokens=2
            )
        error = assert_openai_error(err.value.response.json(), "rate_limit_exceeded")
        assert error["type"] == "rate_limit_error" and "max_waiting_requests" in error["message"]
    for stream in streams:
        stream.close()
    for _ in range(200):
        if server.frontend.num_unfinished == 0:
            break
        time.sleep(0.05)
    assert server.frontend.num_unfinished == 0
    still_serves(server, http_server)


def test_media_domains(guarded: tuple, media_http: tuple) -> None:
    server, http_server = guarded
    base, handler = media_http
    png = media_bytes(random_image(40, 32, seed=11))
    handler.files["/pic.png"] = png
    client = client_for(http_server)
    model = server.frontend.config.model_name

    def ask(url: str) -> str:
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is it?"},
        ]
        messages = [{"role": "user", "content": content}]
        out = client.chat.completions.create(model=model, messages=messages, **GREEDY)
        return out.choices[0].message.content

    from_data_url = ask("data:image/png;base64," + base64.b64encode(png).decode())
    assert ask(f"{base}/pic.png") == from_data_url  # the same bytes, the same answer

    port = base.rsplit(":", 1)[1]
    for url, match in [
        (f"http://localhost:{port}/pic.png", "--allowed-media-domains"),
        (f"{base}/missing.png", "404"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            ask(url)
        assert match in assert_openai_error(err.value.response.json(), "invalid_media")["message"]
    still_serves(server, http_server)
