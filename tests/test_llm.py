"""The offline API: sampling parameters, seeded reproducibility (acceptance 5), stop conditions,
logprobs, chat with data URLs, result order."""

import base64
import io
import math
from pathlib import Path

import pytest
import torch
from mm_testing import hf_greedy, mm_prompt, prompt_text, random_image

from mm_runtime import LLM, SamplingParams
from mm_runtime.shared.errors import MediaError


@pytest.fixture(scope="module")
def llm(tiny_models: dict[str, Path]) -> LLM:
    return LLM(tiny_models["qwen2_vl"], device="cpu")


def prompts(n: int) -> list[dict]:
    questions = ["What is this?", "Describe the weather today.", "hi", "Compare them."]
    out = []
    for i in range(n):
        images = [random_image(48 + 8 * i, 64, seed=i)] * (i % 3)
        out.append(mm_prompt(prompt_text("qwen2_vl", questions[i % 4], len(images)), images))
    return out


def test_seeded_sampling_is_reproducible_and_batch_independent(llm: LLM) -> None:
    target = prompts(1)[0]
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = llm.generate(target, seeded, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate(target, seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == again
    others = prompts(6)[1:]
    noise = [SamplingParams(max_tokens=20, temperature=1.0, seed=s) for s in (None, 7, None, 9, 1)]
    for position in (0, 3, 5):
        batch = others[:position] + [target] + others[position:]
        params = noise[:position] + [seeded] + noise[position:]
        outs = llm.generate(batch, params, use_tqdm=False)
        assert outs[position].outputs[0].token_ids == alone
    other_seed = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=99)
    assert llm.generate(target, other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_results_keep_prompt_order_and_max_tokens(llm: LLM) -> None:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (5, 1, 9, 3)]
    outs = llm.generate(prompts(4), params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 1, 9, 3]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)


def test_stop_token_ids_and_eos(llm: LLM) -> None:
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    tokens = llm.generate(prompts(1), greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = tokens[5]
    params = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop_at], ignore_eos=True)
    out = llm.generate(prompts(1), params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[: tokens.index(stop_at) + 1]
    assert out.finish_reason == "stop"
    eos = next(iter(llm.engine.eos_token_ids))
    llm.engine.eos_token_ids = frozenset({stop_at})  # pretend the model's EOS is that token
    try:
        no_ignore = SamplingParams(max_tokens=16, temperature=0)
        assert llm.generate(prompts(1), no_ignore, use_tqdm=False)[0].outputs[0] == out
    finally:
        llm.engine.eos_token_ids = frozenset({eos})


def test_stop_strings_cut_the_text(llm: LLM) -> None:
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = llm.generate(prompts(1), greedy, use_tqdm=False)[0].outputs[0]
    assert full.text == llm.get_tokenizer().decode(full.token_ids, skip_special_tokens=True)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    out = llm.generate(prompts(1), params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert len(out.token_ids) < len(full.token_ids)


def test_logprobs(llm: LLM) -> None:
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3)
    out = llm.generate(prompts(1), params, use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 4
    for token, lps in zip(out.token_ids, out.logprobs, strict=True):
        assert token in lps and len(lps) <= 4
        assert lps[token] == max(lps.values())  # greedy picks the top token
        assert all(v <= 0 for v in lps.values())
        assert sum(math.exp(v) for v in lps.values()) <= 1 + 1e-5


def test_chat_with_data_url_matches_generate(llm: LLM, tiny_models: dict[str, Path]) -> None:
    image = random_image(64, 48, seed=4)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is in this image?"},
            ],
        },
    ]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    out = llm.chat(messages, greedy, use_tqdm=False)[0]
    text, images = llm.prompts.apply_chat_template(messages)
    assert out.prompt == text and "<|image_pad|>" in text
    expected = hf_greedy(
        tiny_models["qwen2_vl"], text, [image], max_new_tokens=12, add_special_tokens=False
    )
    assert out.outputs[0].token_ids == expected


def test_temperature_sampling_stays_in_top_k(llm: LLM) -> None:
    """top_k=1 with any temperature is greedy."""
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    top1 = SamplingParams(max_tokens=10, temperature=1.5, top_k=1, ignore_eos=True)
    a = llm.generate(prompts(2), greedy, use_tqdm=False)
    b = llm.generate(prompts(2), top1, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_dummy_weights_build_real_shapes(tiny_models: dict[str, Path]) -> None:
    llm = LLM(tiny_models["llava"], device="cpu", load_format="dummy", seed=3)
    out = llm.generate("hello", SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    embed = llm.engine.runner.model.language_model.embed_tokens.weight
    assert embed.abs().max() <= 1e-2 and not torch.all(embed == 0)


def test_a_bad_prompt_among_good_ones_leaves_the_engine_idle(llm: LLM) -> None:
    batch = prompts(3) + [mm_prompt(prompt_text("qwen2_vl", "x", 1), ["/no/such/image.png"])]
    with pytest.raises(MediaError):  # the last prompt's image: nothing of the batch runs
        llm.generate(batch, SamplingParams(max_tokens=50, ignore_eos=True), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(prompts(1), SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3  # and it still serves


def test_batch_defaults_follow_vllm_llm_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """1024 requests and 16384 tokens a step on GPUs of 70 GiB or more but the A100, as vLLM V1's
    LLM class; 256 and 8192 elsewhere; what the caller names wins."""
    from types import SimpleNamespace

    from mm_runtime.llm import _batch_defaults

    cards = {"NVIDIA H200": 141, "NVIDIA H100 80GB HBM3": 80, "NVIDIA A100-SXM4-80GB": 80}
    cards |= {"NVIDIA L4": 24}
    for name, gib in cards.items():
        props = SimpleNamespace(name=name, total_memory=gib * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d, p=props: p)
        big = gib >= 70 and "A100" not in name
        assert _batch_defaults(torch.device("cuda")) == ((1024, 16384) if big else (256, 8192))
    assert _batch_defaults(torch.device("cpu")) == (256, 8192)


def test_named_batch_limits_override_the_defaults(tiny_models: dict[str, Path]) -> None:
    llm = LLM(tiny_models["qwen2_vl"], device="cpu", max_num_seqs=3, max_num_batched_tokens=99)
    assert (llm.config.max_num_seqs, llm.config.max_num_batched_tokens) == (3, 99)
    default = LLM(tiny_models["qwen2_vl"], device="cpu")
    assert (default.config.max_num_seqs, default.config.max_num_batched_tokens) == (256, 8192)
