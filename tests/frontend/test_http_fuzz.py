"""Fuzzing the HTTP API from its own OpenAPI schema (issue 6, acceptance 5), with schemathesis.

Every operation of the app's schema gets schema-valid (positive) and, where it takes input,
schema-breaking (negative) requests against a real server on a tiny model. None may answer 5xx:
bad input is a 4xx in OpenAI's error shape. Afterwards /health is still 200, nothing is left in
flight and a valid chat request still works.

Two tweaks keep the fuzzer past the first check: the schema's messages (any objects, as the app
takes them) are narrowed to OpenAI's message shape, and cases name the served model.
Token budgets are clamped so that each accepted request generates a few tokens only.
"""

import copy
import urllib.request
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# Negative cases need something to break: the GET operations take no parameters.
OPERATIONS = [
    ("/v1/chat/completions", "POST", POSITIVE),
    ("/v1/chat/completions", "POST", NEGATIVE),
    ("/v1/completions", "POST", POSITIVE),
    ("/v1/completions", "POST", NEGATIVE),
    ("/v1/models", "GET", POSITIVE),
    ("/health", "GET", POSITIVE),
    ("/metrics", "GET", POSITIVE),
]
MAX_EXAMPLES = 100  # per case above: about a minute in all on CPU
MAX_TOKENS = 3

_PART = {
    "anyOf": [
        {
            "type": "object",
            "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
        },
        {
            "type": "object",
            "required": ["type", "image_url"],
            "properties": {
                "type": {"const": "image_url"},
                "image_url": {
                    "type": "object",
                    "required": ["url"],
                    "properties": {"url": {"type": "string"}},
                },
            },
        },
        {"type": "object"},  # any other part: refused with 400
    ]
}
MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": ["system", "user", "assistant", "developer", "tool"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _PART}]},
    },
}


def fuzz_schema(openapi: dict) -> dict:
    openapi = copy.deepcopy(openapi)
    chat = openapi["components"]["schemas"]["ChatCompletionRequest"]
    chat["properties"]["messages"]["items"] = MESSAGE
    return openapi


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path], start_http: Callable) -> tuple:
    server, http = start_http(tiny_models["qwen2_vl"])
    return server, http, schemathesis.openapi.from_dict(fuzz_schema(http.app.openapi()))


def tame(body: object, model: str) -> None:
    """A few tokens per accepted request: no budget (None, absent) means up to the model length,
    and fuzzed budgets run into the billions. Non-integer budgets stay, to be refused."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = model
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if (key == "max_tokens" and value is None) or (type(value) is int and value > MAX_TOKENS):
            body[key] = MAX_TOKENS


@pytest.mark.parametrize(("path", "method", "mode"), OPERATIONS, ids=str)
def test_fuzz_operation(served: tuple, path: str, method: str, mode: GenerationMode) -> None:
    server, http, schema = served
    model = server.frontend.config.model_name

    @given(case=schema[path][method].as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: schemathesis.Case) -> None:
        tame(case.body, model)  # may make a negative case valid: it is still a fine case
        response = case.call(base_url=http.address, timeout=60)
        assert response.status_code < 500, (response.status_code, response.text, case.body)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, response.text

    fuzz()
    assert server.frontend.gpu_process.is_alive()


def test_still_serves_after_fuzzing(served: tuple) -> None:
    server, http, _ = served
    assert server.frontend.requests == {} and server.frontend.num_unfinished == 0
    with urllib.request.urlopen(f"{http.address}/health") as response:
        assert response.status == 200
    client = openai.OpenAI(base_url=f"{http.address}/v1", api_key="none", max_retries=0)
    out = client.chat.completions.create(
        model=server.frontend.config.model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage.completion_tokens == 4
