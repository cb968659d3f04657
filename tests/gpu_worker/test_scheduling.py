"""Scheduling never changes outputs: continuous batching, chunked prefill through images,
prefix caching on and off, preemption (acceptance 2); prefix-cache sharing keyed by media
(acceptance 3); one encoder run per image shared by concurrent requests (acceptance 4).
"""

from pathlib import Path

import pytest
from mm_testing import ARCHS, hf_greedy, mm_prompt, prompt_text, random_image

from mm_runtime import LLM, SamplingParams
from mm_runtime.gpu_worker.engine import EngineCore
from mm_runtime.gpu_worker.scheduler import SchedulerOutput
from mm_runtime.shared.wire import EngineRequest

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SHARED_IMAGE = random_image(96, 64, seed=100)

# Requests sharing an image and a long text prefix, so prefix caching has work to do.
REQUESTS = [
    ("What is in this image? Please answer with a short sentence.", [SHARED_IMAGE]),
    ("What is in this image? Please answer with a long sentence.", [SHARED_IMAGE]),
    ("Describe the weather today in the city by the sea.", []),
    ("Compare the two pictures.", [random_image(40, 90, seed=1), SHARED_IMAGE]),
    ("What is in this image? Please answer with a short sentence.", [random_image(64, 64, 2)]),
    ("hi", []),
]


def run_staggered(engine: EngineCore, requests: list[EngineRequest]) -> dict[str, list[int]]:
    """Adds requests a few at a time while earlier ones decode; returns tokens per request."""
    tokens: dict[str, list[int]] = {r.req_id: [] for r in requests}
    pending = list(requests)
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:
            for _ in range(2):
                if pending:
                    engine.add_request(pending.pop(0))
        for out in engine.step():
            tokens[out.req_id].extend(out.new_token_ids)
        step += 1
        assert step < 10_000
    return tokens


def record_schedules(engine: EngineCore) -> list[SchedulerOutput]:
    seen: list[SchedulerOutput] = []
    schedule = engine.scheduler.schedule

    def recording() -> SchedulerOutput:
        out = schedule()
        seen.append(out)
        return out

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    return seen


def split_image_chunks(seen: list[SchedulerOutput]) -> int:
    """Prefill chunks that end strictly inside an image's placeholder range."""
    count = 0
    for out in seen:
        for s in out.scheduled:
            for item in s.req.mm_items:
                if (
                    item.placeholder.offset
                    < s.end
                    < item.placeholder.offset + item.placeholder.length
                ):
                    count += 1
    return count


CONFIGS = {
    "default": {},
    "no_prefix_caching": {"enable_prefix_caching": False},
    "tiny_token_budget": {"max_num_batched_tokens": 6, "block_size": 4},
    "tiny_kv_pool": {"num_kv_blocks": 24, "block_size": 4},
    "tiny_everything": {
        "num_kv_blocks": 24,
        "block_size": 4,
        "max_num_batched_tokens": 5,
        "max_num_seqs": 3,
        "enable_prefix_caching": False,
    },
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", CONFIGS)
def test_scheduling_keeps_outputs(arch: str, config: str, tiny_models: dict[str, Path]) -> None:
    model_dir = tiny_models[arch]
    llm = LLM(model_dir, device="cpu", **CONFIGS[config])
    seen = record_schedules(llm.engine)
    texts = [(prompt_text(arch, q, len(ims)), ims) for q, ims in REQUESTS]
    requests = [llm.build_request(mm_prompt(t, ims), GREEDY) for t, ims in texts]
    tokens = run_staggered(llm.engine, requests)
    for (text, images), req in zip(texts, requests, strict=True):
        assert tokens[req.req_id] == hf_greedy(model_dir, text, images, 24), text
    if config in ("tiny_token_budget", "tiny_everything"):
        assert split_image_chunks(seen) > 0  # an image's range was split across chunks
    if config in ("tiny_kv_pool", "tiny_everything"):
        assert llm.engine.scheduler.num_preemptions > 0
    max_num_seqs = llm.config.max_num_seqs
    assert max(len(out.scheduled) for out in seen) <= max_num_seqs
    assert max(out.num_batched_tokens for out in seen) <= llm.config.max_num_batched_tokens
    assert llm.engine.kv.num_free_blocks == llm.engine.num_kv_blocks - 1  # all freed (null block)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_is_keyed_by_media(arch: str, tiny_models: dict[str, Path]) -> None:
    llm = LLM(tiny_models[arch], device="cpu", block_size=4)
    engine, kv = llm.engine, llm.engine.kv
    question = "What is in this image? Please answer with a short sentence."
    image_a, image_b = random_image(64, 64, seed=5), random_image(64, 64, seed=6)
    text = prompt_text(arch, question, 1)
    first = llm.build_request(mm_prompt(text, [image_a]), GREEDY)
    engine.add_request(first)
    while engine.requests[first.req_id].is_prefill:
        engine.step()
    same = llm.build_request(mm_prompt(text, [image_a]), GREEDY)
    other = llm.build_request(mm_prompt(text, [image_b]), GREEDY)
    assert same.prompt_token_ids == other.prompt_token_ids  # only the image differs
    hits_before = kv.prefix_cache_hits_tokens
    engine.add_request(same)
    engine.step()
    same_hits = kv.prefix_cache_hits_tokens - hits_before
    engine.add_request(other)
    engine.step()
    other_hits = kv.prefix_cache_hits_tokens - hits_before - same_hits

    image_start = first.mm_items[0].placeholder.offset
    blocks_before_image = image_start // 4
    num_prompt_blocks = len(first.prompt_token_ids) // 4
    table = kv.block_ids(first.req_id)
    shared_same = set(table) & set(kv.block_ids(same.req_id))
    shared_other = set(table) & set(kv.block_ids(other.req_id))
    # Same text, same image: every full prompt block but a last one left to compute is shared.
    assert len(shared_same) >= num_prompt_blocks - 1 and same_hits >= 4 * (num_prompt_blocks - 1)
    # Same text, other image: only the blocks wholly before the image are shared.
    assert shared_other == set(table[:blocks_before_image])
    assert other_hits == 4 * blocks_before_image
    while engine.has_unfinished_requests():
        engine.step()


def test_encoder_cache_counts_each_item_once_however_long_it_waits(
    tiny_models: dict[str, Path],
) -> None:
    # Encoder budget for one image a step: the fourth request waits three steps for its image.
    llm = LLM(tiny_models["qwen2_vl"], device="cpu", max_encoder_tokens_per_step=16)
    images = [random_image(112, 112, seed=20 + i) for i in range(4)]  # 16 tokens each
    prompts = [mm_prompt(prompt_text("qwen2_vl", "What is this?", 1), [im]) for im in images]
    steps: list[int] = []
    requests = llm.build_requests(prompts, [GREEDY] * 4)
    for request in requests:
        llm.engine.add_request(request)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        steps.append(llm.engine.runner.num_encoded_items)
    assert steps[:4] == [1, 2, 3, 4]  # one image a step: later requests waited
    cache = llm.engine.encoder_cache
    assert (cache.misses, cache.hits) == (4, 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_encoder_runs_once_per_shared_image(arch: str, tiny_models: dict[str, Path]) -> None:
    llm = LLM(tiny_models[arch], device="cpu", enable_prefix_caching=False)
    questions = ["What is this?", "Describe it.", "What color is it?", "Is it a cat?"]
    prompts = [mm_prompt(prompt_text(arch, q, 1), [SHARED_IMAGE]) for q in questions]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.runner.num_encoded_items == 1
    assert llm.engine.encoder_cache.misses == 1 and llm.engine.encoder_cache.hits == 3
    # A later request with the image still cached does not encode it again either.
    llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    assert llm.engine.runner.num_encoded_items == 1
    for q, out in zip(questions, outputs, strict=True):
        text = prompt_text(arch, q, 1)
        assert out.outputs[0].token_ids == hf_greedy(tiny_models[arch], text, [SHARED_IMAGE], 24)
