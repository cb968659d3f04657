"""The OpenAI-compatible HTTP API (issue 6), driven by the official `openai` client.

A real server (frontend in a background loop, GPU and preprocess workers as processes) with its
HTTP API on a free port. Greedy outputs over HTTP equal the ZMQ SDK's for the same request, sync
and async, streamed and not, on both tiny architectures; errors come in OpenAI's shape.
"""

import asyncio
import base64
import json
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from mm_testing import (
    ARCHS,
    RunningServer,
    assert_openai_error,
    free_port,
    prompt_text,
    random_image,
)
from prometheus_client.parser import text_string_to_metric_families

from mm_runtime import SamplingParams
from mm_runtime.frontend.http_api import HttpServer
from mm_runtime.frontend.sdk import Client, media_bytes

MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
GREEDY_HTTP = {"max_tokens": MAX_TOKENS, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module", params=ARCHS)
def served(request: pytest.FixtureRequest, tiny_models: dict[str, Path]):  # noqa: ANN201
    arch = request.param
    server = RunningServer(tiny_models[arch])
    http = HttpServer(server.frontend, "127.0.0.1", free_port())
    try:
        server.call(http.start())
        yield arch, server, http
    finally:
        server.call(http.stop())
        server.close()


def data_url(seed: int, width: int = 48, height: int = 40) -> str:
    png = media_bytes(random_image(width, height, seed=seed))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def chat_messages(seed: int, question: str) -> list[dict[str, object]]:
    content = [
        {"type": "image_url", "image_url": {"url": data_url(seed)}},
        {"type": "text", "text": question},
    ]
    return [{"role": "user", "content": content}]


def sdk_chat(server: RunningServer, messages: list[dict[str, object]]):  # noqa: ANN201
    with Client(server.address, timeout_s=120) as client:
        return client.chat(messages, GREEDY)


def test_models_and_health(served: tuple) -> None:
    _, server, http = served
    client = openai.OpenAI(base_url=f"{http.address}/v1", api_key="none")
    models = client.models.list().data
    assert [m.id for m in models] == [server.frontend.config.model_name]
    with urllib.request.urlopen(f"{http.address}/health") as response:
        assert response.status == 200


def test_sync_chat_matches_sdk(served: tuple) -> None:
    _, server, http = served
    messages = chat_messages(1, "What is in the picture?")
    expected = sdk_chat(server, messages)
    client = openai.OpenAI(base_url=f"{http.address}/v1", api_key="none")
    model = server.frontend.config.model_name
    out = client.chat.completions.create(model=model, messages=messages, **GREEDY_HTTP)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length"
    # Prompt tokens count the image's placeholder tokens, as the SDK's do.
    assert out.usage.prompt_tokens == expected.usage.prompt_tokens
    assert out.usage.completion_tokens == MAX_TOKENS
    assert out.usage.total_tokens == expected.usage.prompt_tokens + MAX_TOKENS

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY_HTTP,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == out.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_async_clients_match_sdk(served: tuple) -> None:
    arch, server, http = served
    cases = [chat_messages(10 + i, f"Question {i}: what is this?") for i in range(4)]
    expected = [sdk_chat(server, m).text for m in cases]
    text = prompt_text(arch, "Tell me a story.", 0)
    with Client(server.address, timeout_s=120) as sdk:
        expected_completion = sdk.generate(text, None, GREEDY).text
    model = server.frontend.config.model_name

    async def run() -> tuple[list[str], list[str], str, str]:
        client = openai.AsyncOpenAI(base_url=f"{http.address}/v1", api_key="none")

        async def whole(messages: list) -> str:
            out = await client.chat.completions.create(
                model=model, messages=messages, **GREEDY_HTTP
            )
            return out.choices[0].message.content

        async def streamed(messages: list) -> str:
            stream = await client.chat.completions.create(
                model=model, messages=messages, stream=True, **GREEDY_HTTP
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        wholes = await asyncio.gather(*(whole(m) for m in cases))
        streams = await asyncio.gather(*(streamed(m) for m in cases))
        completion = await client.completions.create(model=model, prompt=text, **GREEDY_HTTP)
        stream = await client.completions.create(
            model=model, prompt=text, stream=True, **GREEDY_HTTP
        )
        completion_stream = "".join([c.choices[0].text async for c in stream])
        await client.close()
        return wholes, streams, completion.choices[0].text, completion_stream

    wholes, streams, completion, completion_stream = asyncio.run(run())
    assert wholes == expected and streams == expected
    assert completion == expected_completion == completion_stream


def test_sse_format(served: tuple) -> None:
    _, server, http = served
    body = {
        "model": server.frontend.config.model_name,
        "messages": [{"role": "user", "content": "Hello there"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 4,
        "ignore_eos": True,
    }
    request = urllib.request.Request(
        f"{http.address}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = response.read().decode().split("\n")
    events = [line for line in lines if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_errors_in_openai_shape(served: tuple) -> None:
    _, server, http = served
    client = openai.OpenAI(base_url=f"{http.address}/v1", api_key="none", max_retries=0)
    model = server.frontend.config.model_name
    text_only = [{"role": "user", "content": "Hi"}]

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=text_only, max_tokens=2)
    error = assert_openai_error(err.value.response.json(), "model_not_found")
    assert "no-such-model" in error["message"]

    video = [{"type": "video_url", "video_url": {"url": "file:///x.mp4"}}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": video}], max_tokens=2
        )
    error = err.value.response.json()["error"]
    assert error["code"] == "unsupported_media"
    assert "text" in error["message"] and "image_url" in error["message"]

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=text_only, max_tokens=0)
    assert err.value.response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):  # a schema error: 400, not FastAPI's 422
        client.chat.completions.create(model=model, messages="not a list", max_tokens=2)

    out = client.chat.completions.create(model=model, messages=text_only, **GREEDY_HTTP)
    assert out.usage.completion_tokens == MAX_TOKENS
    assert server.frontend.requests == {}


BAD_CHATS = {  # content parts -> the error code of the 400
    "input_audio": (
        [{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}],
        "unsupported_media",
    ),
    "audio_url": (
        [{"type": "audio_url", "audio_url": {"url": "file:///a.wav"}}],
        "unsupported_media",
    ),
    "broken_image": (
        [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}],
        "invalid_media",
    ),
    "too_many_images": (  # --limit-mm-per-prompt is image=4 by default
        [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in range(5)],
        "too_many_media_items",
    ),
    "prompt_too_long": ([{"type": "text", "text": "many words " * 20_000}], "prompt_too_long"),
}


@pytest.mark.parametrize("case", list(BAD_CHATS))
def test_bad_chats_are_400s_and_the_server_goes_on(served: tuple, case: str) -> None:
    _, server, http = served
    client = openai.OpenAI(base_url=f"{http.address}/v1", api_key="none", max_retries=0)
    model = server.frontend.config.model_name
    content, code = BAD_CHATS[case]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": content}],
                max_tokens=2,
                stream=stream,
            )
        error = assert_openai_error(err.value.response.json(), code)
        assert error["type"] == "invalid_request_error"
    out = client.chat.completions.create(
        model=model, messages=chat_messages(3, "Hi"), **GREEDY_HTTP
    )
    assert out.usage.completion_tokens == MAX_TOKENS
    assert server.frontend.requests == {}


def test_client_disconnect_aborts(served: tuple) -> None:
    _, server, http = served
    before = server.stats()["mm_runtime_requests_aborted_total"]
    client = openai.OpenAI(base_url=f"{http.address}/v1", api_key="none")
    stream = client.chat.completions.create(
        model=server.frontend.config.model_name,
        messages=[{"role": "user", "content": "Go on and on."}],
        stream=True,
        max_tokens=100_000,  # past the model length: runs until aborted or out of room
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    stream.close()
    for _ in range(100):
        if server.stats()["mm_runtime_requests_aborted_total"] > before:
            break
        time.sleep(0.05)
    assert server.stats()["mm_runtime_requests_aborted_total"] == before + 1
    assert server.frontend.requests == {}


def scrape(http: HttpServer) -> dict[tuple[str, frozenset], float]:
    """GET /metrics, parsed: (sample name, labels) -> value."""
    with urllib.request.urlopen(f"{http.address}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics(served: tuple) -> None:
    _, server, http = served
    before = scrape(http)
    names = {name for name, _ in before}
    # DESIGN.md section 6: the names are an interface.
    for name in (
        "mm_runtime_feature_cache_hits_total",
        "mm_runtime_feature_cache_misses_total",
        "mm_runtime_encoder_cache_hits_total",
        "mm_runtime_encoder_cache_misses_total",
        "mm_runtime_prefix_cache_queries_tokens_total",
        "mm_runtime_prefix_cache_hits_tokens_total",
        "mm_runtime_preprocess_seconds_count",
        "mm_runtime_time_to_first_token_seconds_bucket",
        "mm_runtime_time_per_output_token_seconds_sum",
        "mm_runtime_e2e_request_latency_seconds_count",
        "mm_runtime_requests_running",
        "mm_runtime_requests_waiting",
        "mm_runtime_kv_cache_usage_ratio",
        "mm_runtime_requests_total",
    ):
        assert name in names, name

    client = openai.OpenAI(base_url=f"{http.address}/v1", api_key="none")
    model = server.frontend.config.model_name
    client.chat.completions.create(
        model=model, messages=chat_messages(1234, "Which colors?"), **GREEDY_HTTP
    )
    after = scrape(http)

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before.get(key, 0.0)

    assert moved("mm_runtime_requests_total") == 1
    assert moved("mm_runtime_http_requests_total", route="/v1/chat/completions", status="200") == 1
    assert moved("mm_runtime_http_requests_total", route="/metrics", status="200") == 1
    assert moved("mm_runtime_time_to_first_token_seconds_count") == 1
    assert moved("mm_runtime_e2e_request_latency_seconds_count") == 1
    assert moved("mm_runtime_time_per_output_token_seconds_count") == 1
    assert moved("mm_runtime_preprocess_seconds_count") == 1  # a new image: one job
    assert moved("mm_runtime_feature_cache_misses_total") == 1
    assert after[("mm_runtime_requests_running", frozenset())] == 0


def test_n_choices(served: tuple) -> None:
    _, server, http = served
    client = openai.OpenAI(base_url=f"{http.address}/v1", api_key="none", max_retries=0)
    model = server.frontend.config.model_name
    messages = chat_messages(7, "Describe it.")
    expected = sdk_chat(server, messages)

    greedy = client.chat.completions.create(model=model, messages=messages, n=2, **GREEDY_HTTP)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert [c.message.content for c in greedy.choices] == [expected.text] * 2
    assert greedy.usage.prompt_tokens == expected.usage.prompt_tokens  # counted once
    assert greedy.usage.completion_tokens == 2 * MAX_TOKENS

    sampled = {"max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 3, "n": 3}
    sampled["extra_body"] = {"ignore_eos": True}
    whole = client.chat.completions.create(model=model, messages=messages, **sampled)
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) > 1  # seeds 3, 4, 5: different samples
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **sampled,
    )
    streamed = ["", "", ""]
    finished = set()
    usage = None
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            if c.finish_reason is not None:
                finished.add(c.index)
        usage = chunk.usage or usage
    assert streamed == texts and finished == {0, 1, 2}  # seeded: the same samples streamed
    assert usage.completion_tokens == 3 * MAX_TOKENS

    completion = client.completions.create(model=model, prompt="Once upon", n=2, **GREEDY_HTTP)
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.choices[0].text == completion.choices[1].text

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=messages, n=0, max_tokens=2)
    assert err.value.response.json()["error"]["code"] == "invalid_request"
    broken = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]
    for stream in (False, True):  # every choice fails: one error, the others closed cleanly
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": broken}],
                n=3,
                max_tokens=2,
                stream=stream,
            )
        assert err.value.response.json()["error"]["code"] == "invalid_media"
    out = client.chat.completions.create(model=model, messages=messages, **GREEDY_HTTP)
    assert out.choices[0].message.content == expected.text
    assert server.frontend.requests == {}
