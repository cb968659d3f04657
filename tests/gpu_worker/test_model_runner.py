"""The model runner: its batch layout, its decode-graph padding, its memory-profile inputs.

On CPU: the vectorized layout (`ModelRunner._prepare_inputs`) against a per-request reference on
mixed steps (prefill chunks cutting through images, decodes, M-RoPE); the decode-graph path with
each graph replaced by the very function it captures, so the padded rows run through the torch
reference attention; the dummy encoder items of the profile step. On the GPU: CUDA graphs give
the eager tokens, and the memory profile leaves memory free.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from mm_testing import ARCHS, hf_greedy, mm_prompt, prompt_text, random_image

from mm_runtime import LLM, SamplingParams
from mm_runtime.gpu_worker.cuda_graphs import DecodeGraphs, capture_sizes
from mm_runtime.gpu_worker.input_batch import StepInputs
from mm_runtime.gpu_worker.kv_cache import KVCacheManager
from mm_runtime.gpu_worker.layers.attention import TorchAttentionBackend
from mm_runtime.gpu_worker.model_runner import ModelRunner
from mm_runtime.gpu_worker.models.loader import build_model
from mm_runtime.gpu_worker.request import Request
from mm_runtime.gpu_worker.scheduler import SchedulerOutput
from mm_runtime.shared.model_info import ModelInfo
from mm_runtime.shared.tiny_models import TinyModelSpec, write_tiny_model

# Image sizes chosen so Qwen2-VL's items (4..64 tokens) outgrow a 24-token step budget.
WORKLOAD = [
    ("Describe the weather today.", [], 9),
    ("What is in this image?", [(300, 200)], 5),
    ("Compare the two pictures.", [(40, 90), (120, 64)], 12),
    ("hi", [], 3),
    ("Tell me about it.", [(56, 56)], 7),
]


def workload(arch: str) -> list[tuple[str, list, int]]:
    out = []
    for i, (question, sizes, max_tokens) in enumerate(WORKLOAD):
        images = [random_image(w, h, seed=10 * i + j) for j, (w, h) in enumerate(sizes)]
        out.append((prompt_text(arch, question, len(images)), images, max_tokens))
    return out


def generate(llm: LLM, requests: list[tuple[str, list, int]]) -> list[list[int]]:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, _, n in requests]
    prompts = [mm_prompt(text, images) for text, images, _ in requests]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


# ---- the vectorized layout against a per-request reference ----


def reference_positions(req: Request, start: int, end: int, mrope: bool) -> torch.Tensor:
    """The former per-request code: [n], or [3, n] (prompt grid, then index + delta)."""
    if not mrope:
        return torch.arange(start, end)
    assert req.mrope_positions is not None
    prompt_end = min(end, req.num_prompt_tokens)
    parts = [req.mrope_positions[:, start:prompt_end]]
    if end > req.num_prompt_tokens:
        generated = torch.arange(max(start, req.num_prompt_tokens), end) + req.mrope_delta
        parts.append(generated.expand(3, -1))
    return torch.cat(parts, dim=1)


def check_layout(
    runner: ModelRunner, sched: SchedulerOutput, kv: KVCacheManager, inputs: StepInputs
) -> None:
    bs, mrope = runner.config.block_size, runner.model.uses_mrope
    ids: list[int] = []
    positions, slots, segments, sample_rows, query_start = [], [], [], [], [0]
    for i, s in enumerate(sched.scheduled):
        req, base = s.req, len(ids)
        table = kv.block_ids(req.req_id)
        assert inputs.meta.block_tables[i, : len(table)].tolist() == table
        ids += req.token_ids[s.start : s.end]
        if s.end > req.num_tokens:  # pending: the token the previous step sampled for it
            assert runner._last_sampled is not None
            ids.append(int(runner._last_sampled[runner._last_sample_rows[req]]))
        positions.append(reference_positions(req, s.start, s.end, mrope))
        slots += [table[p // bs] * bs + p % bs for p in range(s.start, s.end)]
        for item in req.mm_items:
            offset, length = item.placeholder.offset, item.placeholder.length
            lo, hi = max(s.start, offset), min(s.end, offset + length)
            if lo < hi:
                segment = (req.req_id, item.mm_hash, lo - offset, hi - offset, base + lo - s.start)
                segments.append(segment)
        query_start.append(len(ids))
        if s.samples:
            sample_rows.append(len(ids) - 1)
    num_reqs = len(sched.scheduled)
    assert inputs.graph_size is None
    assert inputs.input_ids.tolist() == ids
    assert torch.equal(inputs.positions, torch.cat(positions, dim=-1))
    assert inputs.meta.slot_mapping.tolist() == slots
    assert inputs.meta.query_start_loc.tolist() == query_start
    assert inputs.meta.seq_lens.tolist() == [s.end for s in sched.scheduled]
    assert inputs.meta.block_tables.shape == (num_reqs, runner.max_blocks_per_req)
    assert inputs.meta.max_query_len == max(s.num_new_tokens for s in sched.scheduled)
    assert inputs.meta.max_seq_len == max(s.end for s in sched.scheduled)
    assert inputs.num_sampling == len(sample_rows)
    rows = inputs.logits_indices
    assert (list(range(len(sample_rows))) if rows is None else rows.tolist()) == sample_rows
    assert inputs.mm_segments == segments


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_matches_per_request_reference(
    arch: str, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tiny_models[arch]
    # A small step budget and small blocks: prefills are chunked (through images too) and run
    # beside other requests' decodes; block tables span many blocks.
    llm = LLM(
        model_dir,
        device="cpu",
        max_num_batched_tokens=24,
        max_num_seqs=4,
        block_size=4,
        max_model_len=512,
    )
    engine, runner = llm.engine, llm.engine.runner
    prepare = runner._prepare_inputs
    seen = {"mixed": 0, "partial_media": 0}

    def checked_prepare(sched: SchedulerOutput, kv: KVCacheManager) -> StepInputs:
        inputs = prepare(sched, kv)
        check_layout(runner, sched, kv, inputs)
        prefills = [s for s in sched.scheduled if s.start < s.req.num_prompt_tokens]
        seen["mixed"] += 0 < len(prefills) < len(sched.scheduled)
        lengths = {it.mm_hash: it.placeholder.length for s in prefills for it in s.req.mm_items}
        seen["partial_media"] += any(hi - lo < lengths[h] for _, h, lo, hi, _ in inputs.mm_segments)
        return inputs

    monkeypatch.setattr(runner, "_prepare_inputs", checked_prepare)
    requests = workload(arch)
    outputs = generate(llm, requests)
    assert seen["mixed"] and seen["partial_media"], seen
    for (text, images, max_tokens), tokens in zip(requests, outputs, strict=True):
        assert tokens == hf_greedy(model_dir, text, images, max_new_tokens=max_tokens)
    assert engine.kv.usage == 0


# ---- the decode-graph path, with graphs replaced by what they capture ----


class EagerGraph:
    """Stands in for a captured graph on CPU: `replay` runs the function it would capture."""

    def __init__(self, forward: object, size: int, replayed: list[int]) -> None:
        self.forward, self.size, self.replayed = forward, size, replayed

    def replay(self) -> None:
        self.replayed.append(self.size)
        self.forward(self.size)


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_decode_path_gives_eager_tokens(
    arch: str, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Padded rows (token 0, slot 0 of the null block, seq_len 1) change no real row: the torch
    reference writes their K/V and attends over them like any other row."""
    requests = workload(arch)
    eager = generate(LLM(tiny_models[arch], device="cpu", max_model_len=256), requests)

    llm = LLM(tiny_models[arch], device="cpu", max_model_len=256, max_num_seqs=8)
    runner = llm.engine.runner
    replayed: list[int] = []
    runner.graphs = DecodeGraphs(capture_sizes(8, 8192))  # [1, 2, 4, 8]
    vocab_size = runner.model.config.get_text_config().vocab_size
    runner._graph_logits = torch.empty(8, vocab_size)

    def capture(forward: object) -> None:
        runner.graphs.graphs = {s: EagerGraph(forward, s, replayed) for s in runner.graphs.sizes}

    monkeypatch.setattr(runner.graphs, "capture", capture)
    runner.capture_cuda_graphs()
    prepare = runner._prepare_inputs
    padded_steps = []

    def recording_prepare(sched: SchedulerOutput, kv: KVCacheManager) -> StepInputs:
        inputs = prepare(sched, kv)
        if inputs.graph_size is not None and inputs.graph_size > len(sched.scheduled):
            padded_steps.append((len(sched.scheduled), inputs.graph_size))
        return inputs

    monkeypatch.setattr(runner, "_prepare_inputs", recording_prepare)
    assert generate(llm, requests) == eager
    assert replayed and padded_steps  # decode steps took the graph path, some of them padded
    assert llm.engine.kv.usage == 0


def test_capture_sizes_and_padding() -> None:
    assert capture_sizes(256, 8192) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(100, 8192)[-3:] == [88, 96, 100]
    assert capture_sizes(3, 8192) == [1, 2, 3]
    assert capture_sizes(256, 20) == [1, 2, 4, 8, 16, 20]
    graphs = DecodeGraphs(capture_sizes(20, 8192))
    assert graphs.padded_size(3) is None  # nothing captured yet
    graphs.graphs = dict.fromkeys(graphs.sizes)  # type: ignore[arg-type]
    assert [graphs.padded_size(n) for n in (1, 3, 4, 5, 17, 20, 21)] == [1, 4, 4, 8, 20, 20, None]


# ---- dummy encoder items for the memory profile ----


@pytest.fixture(scope="module")
def cpu_models(tiny_models: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return {
        arch: build_model(
            ModelInfo.from_model_dir(path),
            TorchAttentionBackend(),
            torch.float32,
            torch.device("cpu"),
        )
        for arch, path in tiny_models.items()
    }


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("max_tokens", [1, 9, 40, 64, 100, 1000])
def test_dummy_encoder_items(arch: str, max_tokens: int, cpu_models: dict) -> None:
    model = cpu_models[arch]
    items = model.dummy_encoder_items(max_tokens)
    lengths = [item.placeholder.length for item in items]
    assert [model.item_length(item) for item in items] == lengths
    assert sum(lengths) >= max_tokens > sum(lengths[:-1])  # enough items, not one more
    # The largest item the processor makes comes first (tiny Qwen2-VL: max_pixels -> 64).
    largest = 9 if arch == "llava" else 64
    assert lengths[0] == min(largest, max(lengths)) and max(lengths) <= largest
    if max_tokens >= largest:
        assert lengths[0] == largest
    with torch.inference_mode():
        outputs = model.encode(items[:3])
    assert [out.shape[0] for out in outputs] == lengths[:3]


def test_qwen2_vl_profiles_the_hub_preprocessor_config(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A directory in the hub's layout (preprocessor_config.json with min/max_pixels): the memory
    profile's largest image follows the settings the loaded processor resizes by."""
    model_dir = tmp_path / "qwen2_vl"
    shutil.copytree(tiny_models["qwen2_vl"], model_dir)
    processor = json.loads((model_dir / "processor_config.json").read_text())
    settings = processor.pop("image_processor")
    del settings["size"]
    settings.update(min_pixels=3136, max_pixels=28 * 28 * 16)
    (model_dir / "processor_config.json").write_text(json.dumps(processor))
    (model_dir / "preprocessor_config.json").write_text(json.dumps(settings))
    info = ModelInfo.from_model_dir(model_dir)
    model = build_model(info, TorchAttentionBackend(), torch.float32, torch.device("cpu"))
    # 4 x 4 merged tokens per image at most; the last one keeps the rows it needs.
    assert [item.placeholder.length for item in model.dummy_encoder_items(40)] == [16, 16, 8]


# ---- on the GPU ----


@pytest.fixture(scope="module")
def head64_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models with a head size the CUDA attention kernels take (the default's 16 is not),
    so CUDA graphs are on."""
    root = tmp_path_factory.mktemp("head64")
    spec = {"hidden_size": 256, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512}
    return {arch: write_tiny_model(root / arch, TinyModelSpec(arch, **spec)) for arch in ARCHS}


def run_on_gpu(model_dir: Path, requests: list, enforce_eager: bool) -> tuple[list, list[int]]:
    """Greedy tokens in bf16, and the batch sizes of the decode graphs replayed."""
    llm = LLM(
        model_dir,
        device="cuda",
        dtype="bfloat16",
        max_num_seqs=16,
        gpu_memory_utilization=0.3,
        enforce_eager=enforce_eager,
    )
    graphs = llm.engine.runner.graphs
    assert (graphs is None) == enforce_eager
    replayed: list[int] = []
    if graphs is not None:
        assert sorted(graphs.graphs) == [1, 2, 4, 8, 16]
        replay = graphs.replay
        graphs.replay = lambda size: (replayed.append(size), replay(size))  # type: ignore[method-assign]
    tokens = generate(llm, requests)
    del llm, graphs
    torch.cuda.empty_cache()
    return tokens, replayed


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graphs_give_eager_tokens(arch: str, head64_models: dict[str, Path]) -> None:
    requests = workload(arch) + workload(arch)[:2]  # 7 requests: decode batches are padded
    eager, _ = run_on_gpu(head64_models[arch], requests, enforce_eager=True)
    graphs, replayed = run_on_gpu(head64_models[arch], requests, enforce_eager=False)
    assert graphs == eager
    assert replayed and max(replayed) == 8  # 7 requests decode as a padded batch of 8


@pytest.mark.gpu
def test_memory_profile_leaves_memory_free(head64_models: dict[str, Path]) -> None:
    """The KV cache takes what the profile step leaves of gpu_memory_utilization, and a step at
    the profiled limits (max_num_batched_tokens, images) stays within it."""
    utilization = 0.1
    llm = LLM(
        head64_models["qwen2_vl"],
        device="cuda",
        dtype="bfloat16",
        gpu_memory_utilization=utilization,
        block_size=128,
        max_model_len=65536,
        max_num_seqs=256,
    )
    runner = llm.engine.runner
    cap = 256 * runner.max_blocks_per_req + 1
    assert llm.engine.num_kv_blocks < cap  # the memory budget decided, not the cap
    free_bytes, total_bytes = torch.cuda.mem_get_info()
    used_bytes = total_bytes - free_bytes
    assert used_bytes <= total_bytes * utilization
    assert used_bytes >= 0.5 * total_bytes * utilization  # the KV cache took the budget
    long_text = prompt_text("qwen2_vl", "Describe the picture in detail. " * 900, 2)
    images = [random_image(1280, 720, seed=1), random_image(720, 1280, seed=2)]
    generate(llm, [(long_text, images, 4)] + [(prompt_text("qwen2_vl", "hi", 0), [], 16)] * 64)
    free_bytes, _ = torch.cuda.mem_get_info()
    assert free_bytes >= total_bytes * (1 - utilization) - 2**28  # 256 MiB of slack
