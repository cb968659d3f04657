"""`/v1/completions` beyond one text prompt (issue 6): legacy logprobs, prompt lists, token ids,
and the logprobs cap of both APIs, driven by the official `openai` client.

The reference is the ZMQ SDK on the same server: greedy text, token ids and logprobs of the
same prompt. Legacy logprobs are OpenAI's parallel lists (`tokens`, `token_logprobs`,
`top_logprobs` as token -> logprob dicts of the top N plus the sampled token, `text_offset`
into the choice's text); streamed chunks continue one another.
"""

import json
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from mm_testing import ARCHS, RunningServer, http_post, prompt_text

from mm_runtime import SamplingParams
from mm_runtime.frontend.sdk import Client, Completion

MAX_TOKENS = 10
GREEDY_HTTP = {"max_tokens": MAX_TOKENS, "temperature": 0, "extra_body": {"ignore_eos": True}}
LEGACY_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


@pytest.fixture(scope="module", params=ARCHS)
def served(request: pytest.FixtureRequest, tiny_models: dict[str, Path], start_http: Callable):  # noqa: ANN201
    server, http = start_http(tiny_models[request.param])
    client = openai.OpenAI(base_url=f"{http.address}/v1", api_key="none", max_retries=0)
    return request.param, server, http, client


def sdk_generate(server: RunningServer, text: str, logprobs: int | None = None) -> Completion:
    params = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=logprobs
    )
    with Client(server.address, timeout_s=120) as client:
        return client.generate(text, None, params)


def legacy(logprobs: object) -> dict[str, list]:
    """The openai client's `Logprobs` object as plain lists."""
    return {key: list(getattr(logprobs, key)) for key in LEGACY_KEYS}


def test_logprobs_match_sdk(served: tuple) -> None:
    arch, server, _, client = served
    model = server.frontend.config.model_name
    tokenizer = server.frontend.prompts.tokenizer
    text = prompt_text(arch, "Write a few words about the sea.", 0)
    expected = sdk_generate(server, text, logprobs=3)

    out = client.completions.create(model=model, prompt=text, logprobs=3, **GREEDY_HTTP)
    choice = out.choices[0]
    assert choice.text == expected.text
    got = legacy(choice.logprobs)
    ids = expected.token_ids
    assert got["tokens"] == [tokenizer.decode([t]) for t in ids]
    sampled = [e.sampled.logprob for e in expected.logprobs]
    assert got["token_logprobs"] == pytest.approx(sampled)
    for top, entry in zip(got["top_logprobs"], expected.logprobs, strict=True):
        # The top 3 best first, then the sampled token; alike-decoding tokens keep the best.
        want: dict[str, float] = {}
        for lp in [*entry.top, entry.sampled]:
            want.setdefault(tokenizer.decode([lp.token_id]), lp.logprob)
        assert top == pytest.approx(want)
        assert max(top.values()) == pytest.approx(entry.sampled.logprob)  # greedy: the best
    # Where each token starts in the text: after what the tokens before it decode to, less a
    # character they have only begun (U+FFFD until its last byte comes).
    before = [tokenizer.decode(ids[:i], skip_special_tokens=True) for i in range(len(ids))]
    assert got["text_offset"] == [len(t.rstrip("\ufffd")) for t in before]

    stream = client.completions.create(
        model=model, prompt=text, logprobs=3, stream=True, **GREEDY_HTTP
    )
    streamed = {key: [] for key in LEGACY_KEYS}
    streamed_text = ""
    for chunk in stream:
        for c in chunk.choices:
            streamed_text += c.text
            for key, values in legacy(c.logprobs).items():
                streamed[key] += values
    assert streamed_text == choice.text
    assert streamed["tokens"] == got["tokens"] and streamed["text_offset"] == got["text_offset"]
    assert streamed["token_logprobs"] == pytest.approx(got["token_logprobs"])
    assert streamed["top_logprobs"] == got["top_logprobs"]

    # logprobs=0: the sampled token's own logprob only; no logprobs: null.
    zero = client.completions.create(model=model, prompt=text, logprobs=0, **GREEDY_HTTP)
    zero_lp = legacy(zero.choices[0].logprobs)
    assert zero_lp["tokens"] == got["tokens"]
    assert zero_lp["top_logprobs"] == [
        {token: lp} for token, lp in zip(zero_lp["tokens"], zero_lp["token_logprobs"], strict=True)
    ]
    plain = client.completions.create(model=model, prompt=text, **GREEDY_HTTP)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == expected.text


def test_prompt_lists_and_token_ids(served: tuple) -> None:
    arch, server, _, client = served
    model = server.frontend.config.model_name
    tokenizer = server.frontend.prompts.tokenizer
    texts = [prompt_text(arch, q, 0) for q in ("Name a color.", "Count to three, slowly please.")]
    expected = [sdk_generate(server, t) for t in texts]
    prompt_tokens = [e.usage.prompt_tokens for e in expected]
    assert prompt_tokens[0] != prompt_tokens[1]  # so a wrong sum shows
    # The SDK's prompt path adds the tokenizer's special tokens: the same ids as these.
    ids = [tokenizer(t)["input_ids"] for t in texts]
    assert [len(i) for i in ids] == prompt_tokens

    for prompt in (texts, ids):  # strings, or lists of token ids
        out = client.completions.create(model=model, prompt=prompt, n=2, **GREEDY_HTTP)
        assert [c.index for c in out.choices] == [0, 1, 2, 3]  # prompt * n + j
        assert [c.text for c in out.choices] == [e.text for e in expected for _ in range(2)]
        assert out.usage.prompt_tokens == sum(prompt_tokens)  # each prompt once, not once per n
        assert out.usage.completion_tokens == 4 * MAX_TOKENS
        assert out.usage.total_tokens == sum(prompt_tokens) + 4 * MAX_TOKENS

    one = client.completions.create(model=model, prompt=ids[1], **GREEDY_HTTP)  # one id list
    assert [c.text for c in one.choices] == [expected[1].text]
    assert one.usage.prompt_tokens == prompt_tokens[1]

    stream = client.completions.create(
        model=model,
        prompt=[ids[1], ids[0]],
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY_HTTP,
    )
    streamed, finished, usage = ["", ""], set(), None
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.text
            if c.finish_reason is not None:
                finished.add(c.index)
        usage = chunk.usage or usage
    assert streamed == [expected[1].text, expected[0].text] and finished == {0, 1}
    assert usage.prompt_tokens == sum(prompt_tokens)
    assert usage.completion_tokens == 2 * MAX_TOKENS


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ([], "empty list"),
        ([[]], "prompt is empty"),
        ([["a"]], "prompt"),  # a list of lists holds token ids only
        (["a", 1], "prompt"),  # one kind per list
    ],
    ids=["empty", "empty-ids", "nested-strings", "mixed"],
)
def test_bad_prompts(served: tuple, prompt: object, match: str) -> None:
    _, server, _, client = served
    model = server.frontend.config.model_name
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=prompt, max_tokens=2)
    error = err.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and match in error["message"]


def test_bad_token_ids(served: tuple) -> None:
    """Ids the model cannot embed, and the image token with no image to fill it: 400 each, and
    the server goes on serving."""
    arch, server, _, client = served
    model = server.frontend.config.model_name
    vocab_size = server.frontend.info.hf_config.get_text_config().vocab_size
    image_token_id = server.frontend.info.image_token_id
    for ids, match in (
        ([1, vocab_size], "token ids must be in"),
        ([1, -1], "token ids must be in"),
        ([1, image_token_id, 2], "image tokens"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=model, prompt=ids, max_tokens=2)
        assert match in err.value.response.json()["error"]["message"]
    text = prompt_text(arch, "Still there?", 0)
    out = client.completions.create(model=model, prompt=text, **GREEDY_HTTP)
    assert out.choices[0].text == sdk_generate(server, text).text
    assert server.frontend.requests == {}


def test_logprobs_capped_at_20(served: tuple) -> None:
    arch, server, http, client = served
    model = server.frontend.config.model_name
    text = prompt_text(arch, "Hello", 0)
    messages = [{"role": "user", "content": "Hello"}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=model, messages=messages, logprobs=True, top_logprobs=21, stream=stream
            )
        error = err.value.response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
        assert "top_logprobs" in error["message"] and "20" in error["message"]
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=model, prompt=text, logprobs=21, stream=stream)
        error = err.value.response.json()["error"]
        assert "logprobs" in error["message"] and "20" in error["message"]
    for body in ({"logprobs": -1}, {"logprobs": 10**6}):  # raw, past what the client checks
        raw = json.dumps({"model": model, "prompt": text, **body}).encode()
        status, reply = http_post(f"{http.address}/v1/completions", raw)
        assert status == 400 and set(reply["error"]) == {"message", "type", "param", "code"}

    # The cap itself is allowed, and the server serves on.
    chat = client.chat.completions.create(
        model=model, messages=messages, logprobs=True, top_logprobs=20, **GREEDY_HTTP
    )
    entries = chat.choices[0].logprobs.content
    assert len(entries) == MAX_TOKENS and all(len(e.top_logprobs) == 20 for e in entries)
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in entries)  # greedy
    out = client.completions.create(model=model, prompt=text, logprobs=20, **GREEDY_HTTP)
    tops = out.choices[0].logprobs.top_logprobs
    assert len(tops) == MAX_TOKENS and all(1 <= len(t) <= 21 for t in tops)
    assert server.frontend.requests == {}
