"""The multi-process runtime end to end, with real processes and sockets (issue 4).

Acceptance 1: through the server + SDK, greedy outputs equal the in-process `LLM`'s, for both
tiny architectures, 16 concurrent clients, streamed and not. Acceptance 2 (first half): an image
already sent skips preprocessing and sends no tensor bytes. Acceptance 3: a forced receiver miss.
"""

import asyncio
from pathlib import Path

import pytest
from mm_testing import ARCHS, RunningServer, mm_prompt, prompt_text, random_image

from mm_runtime import LLM, SamplingParams
from mm_runtime.frontend.sdk import AsyncClient, Client, media_bytes
from mm_runtime.shared.errors import MMRuntimeError

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCHS)
def served(request: pytest.FixtureRequest, tiny_models: dict[str, Path]):  # noqa: ANN201
    arch = request.param
    server = RunningServer(tiny_models[arch])
    yield arch, tiny_models[arch], server
    server.close()


def workload(arch: str) -> list[tuple[str, list]]:
    out = []
    for i in range(16):
        images = [random_image(40 + 7 * i, 60 + 5 * (i % 4), seed=i)] * (i % 3)
        if i % 5 == 0:
            images = [random_image(33, 99, seed=100)]  # repeated across requests
        out.append((prompt_text(arch, f"Question number {i}: what is this?", len(images)), images))
    return out


def test_server_matches_in_process_llm(served: tuple) -> None:
    arch, model_dir, server = served
    cases = workload(arch)
    llm = LLM(model_dir, device="cpu")
    expected = llm.generate([mm_prompt(t, ims) for t, ims in cases], GREEDY, use_tqdm=False)

    async def one(i: int, text: str, images: list) -> tuple[list[int], str, list[int], str]:
        async with AsyncClient(server.address, timeout_s=120) as client:
            done = await client.generate(text, images, GREEDY)
            streamed_ids, streamed_text = [], ""
            async for delta in client.stream(text, images, GREEDY):
                streamed_ids += delta.token_ids
                streamed_text += delta.text
            return done.token_ids, done.text, streamed_ids, streamed_text

    async def all_clients() -> list:
        return await asyncio.gather(*(one(i, t, ims) for i, (t, ims) in enumerate(cases)))

    results = asyncio.run(all_clients())
    for exp, (ids, text, s_ids, s_text) in zip(expected, results, strict=True):
        assert ids == exp.outputs[0].token_ids
        assert text == exp.outputs[0].text
        assert s_ids == ids and s_text == text


def test_chat_and_blocking_client(served: tuple) -> None:
    arch, model_dir, server = served
    image = random_image(50, 50, seed=7)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}],
        }
    ]
    llm = LLM(model_dir, device="cpu")
    expected = llm.chat(messages, GREEDY, use_tqdm=False)[0].outputs[0]
    with Client(server.address, timeout_s=120) as client:
        out = client.chat(messages, GREEDY)
        assert out.token_ids == expected.token_ids and out.finish_reason == "length"
        assert out.usage.completion_tokens == 16
        assert out.usage.prompt_tokens == len(
            llm.chat(messages, GREEDY, use_tqdm=False)[0].prompt_token_ids
        )
        stats = client.health()
        assert stats["mm_runtime_requests_running"] == 0


def test_repeated_image_travels_as_hash_only(served: tuple) -> None:
    arch, _, server = served
    image = media_bytes(random_image(64, 48, seed=42))
    text = prompt_text(arch, "Describe it.", 1)
    with Client(server.address, timeout_s=120) as client:
        first = client.generate(text, [image], GREEDY)
        before = client.health()
        second = client.generate(text, [image], GREEDY)
        after = client.health()
    assert first.token_ids == second.token_ids
    assert after["mm_runtime_preprocess_jobs_total"] == before["mm_runtime_preprocess_jobs_total"]
    assert (
        after["mm_runtime_feature_cache_tensor_bytes_sent_total"]
        == before["mm_runtime_feature_cache_tensor_bytes_sent_total"]
    )
    assert (
        after["mm_runtime_feature_cache_hits_total"]
        == before["mm_runtime_feature_cache_hits_total"] + 1
    )
    assert after["gpu_feature_cache_hits_total"] == before["gpu_feature_cache_hits_total"] + 1
    _, _, keys = server.call(server.frontend.stats())
    assert list(server.frontend.mirror.lru.keys()) == keys  # same keys, same LRU order


def test_forced_receiver_miss_self_heals(served: tuple) -> None:
    """The mirror claims the GPU worker holds an image it never got: that request fails with a
    clear error, both caches reset, and the same image then works."""
    arch, model_dir, server = served
    image = random_image(80, 30, seed=77)
    data = media_bytes(image)
    text = prompt_text(arch, "What is this?", 1)
    from mm_runtime.shared.hashing import hash_media

    mirror = server.frontend.mirror
    epoch = mirror.epoch
    num_tokens = LLM(model_dir, device="cpu").image_processor(image).num_tokens

    async def plant() -> None:
        mirror.lru.put(hash_media(data), num_tokens, 1)

    server.call(plant())
    with Client(server.address, timeout_s=120) as client:
        with pytest.raises(MMRuntimeError) as err:
            client.generate(text, [data], GREEDY)
        assert err.value.code == "feature_cache_miss" and "feature cache" in err.value.message
        ok = client.generate(text, [data], GREEDY)
    assert len(ok.token_ids) == 16
    assert mirror.epoch == epoch + 1
    _, _, keys = server.call(server.frontend.stats())
    assert list(mirror.lru.keys()) == keys


def test_concurrent_requests_share_one_preprocessing_job(served: tuple) -> None:
    arch, _, server = served
    image = media_bytes(random_image(120, 90, seed=123))
    text = prompt_text(arch, "Same picture, many askers.", 1)
    before = server.stats()

    async def many() -> list:
        async with AsyncClient(server.address, timeout_s=120) as client:
            return await asyncio.gather(*(client.generate(text, [image], GREEDY) for _ in range(8)))

    outs = asyncio.run(many())
    after = server.stats()
    assert len({tuple(o.token_ids) for o in outs}) == 1
    jobs = after["mm_runtime_preprocess_jobs_total"] - before["mm_runtime_preprocess_jobs_total"]
    assert jobs == 1
    assert after["preprocess_jobs_done"] - before["preprocess_jobs_done"] == 1
    hits = (
        after["mm_runtime_feature_cache_hits_total"] - before["mm_runtime_feature_cache_hits_total"]
    )
    assert hits == 7  # the first request carried the tensors, the others the hash only


def test_logprobs_and_stop_strings_match_llm(served: tuple) -> None:
    arch, model_dir, server = served
    text = prompt_text(arch, "Describe the weather today.", 0)
    llm = LLM(model_dir, device="cpu")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    expected = llm.generate(text, params, use_tqdm=False)[0].outputs[0]
    stop = expected.text[3:6]
    stop_params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=[stop])
    expected_stop = llm.generate(text, stop_params, use_tqdm=False)[0].outputs[0]
    with Client(server.address, timeout_s=120) as client:
        out = client.generate(text, None, params)
        streamed = list(client.stream(text, None, stop_params))
    assert out.logprobs is not None and len(out.logprobs) == 8
    for got, want in zip(out.logprobs, expected.logprobs, strict=True):
        assert {lp.token_id: lp.logprob for lp in [got.sampled, *got.top]} == pytest.approx(want)
    assert "".join(d.text for d in streamed) == expected_stop.text
    assert streamed[-1].finish_reason == "stop" == expected_stop.finish_reason
