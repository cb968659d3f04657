"""Runs one scheduled step: encoders for new media items, then the language model, then sampling.

Owns the model, the paged KV cache tensors, the sampler and the step's input buffers. Inputs of
all scheduled requests are flattened into one batch (no padding); encoder outputs are copied into
the input embeddings at placeholder positions, sliced to the part of each item the chunk covers.

The batch layout is built with numpy over the whole batch into host buffers allocated once, then
sent with one copy per field into device buffers that never move (gpu_worker/input_batch.py);
the attention metadata are views of those (as vLLM V1's GPU model runner,
vllm/v1/worker/gpu_model_runner.py). On CUDA:
- host buffers are pinned and the copies non-blocking; media tensors go to the device from
  pinned memory on a copy stream, while the CPU builds the batch layout;
- before the KV cache is sized, a profile step with the worst-case media and token counts
  measures the peak memory (`ModelRunner.num_kv_blocks_to_allocate`);
- decode steps replay CUDA graphs (gpu_worker/cuda_graphs.py) unless `enforce_eager`.
"""

import gc
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain

import msgspec
import numpy as np
import torch
from torch.profiler import record_function

from mm_runtime.gpu_worker.cuda_graphs import DecodeGraphs, capture_sizes, graph_pool_bytes
from mm_runtime.gpu_worker.encoder_cache import EncoderCache
from mm_runtime.gpu_worker.input_batch import InputBuffers, StepInputs
from mm_runtime.gpu_worker.kv_cache import KVCacheManager
from mm_runtime.gpu_worker.layers.attention import AttentionBackend, TorchAttentionBackend
from mm_runtime.gpu_worker.models.decoder import head_dim_of
from mm_runtime.gpu_worker.models.loader import build_model
from mm_runtime.gpu_worker.request import Request
from mm_runtime.gpu_worker.sampler import Sampler, SamplerOutput, SamplingBatch
from mm_runtime.gpu_worker.scheduler import SchedulerOutput
from mm_runtime.shared.config import GpuWorkerConfig
from mm_runtime.shared.errors import ConfigError
from mm_runtime.shared.model_info import ModelInfo
from mm_runtime.shared.wire import MMItem, SamplingParams

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GiB = 2**30
# Decode graphs, for the memory profile: what the smaller graphs add to the largest one's pool,
# and the device memory a graph takes outside it (about 1.3 MiB on an H100), rounded up.
GRAPH_POOL_GROWTH = 1.25
GRAPH_BYTES = 2 * 2**20
# The profile's sampler step takes every filter and logprobs, its most memory-hungry path.
PROFILE_SAMPLING = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, logprobs=20)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, info: ModelInfo, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in half precision are slow and inexact
    dtype = getattr(info.hf_config, "dtype", None) or getattr(info.hf_config, "torch_dtype", None)
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def attention_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> AttentionBackend:
    """The CUDA kernels where they support the dtype and head size, else the torch reference."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        from mm_runtime.gpu_worker.layers.cuda_attention import CudaAttentionBackend

        if CudaAttentionBackend.supports(dtype, head_dim):
            return CudaAttentionBackend()
    return TorchAttentionBackend()


@dataclass(slots=True)
class StepResult:
    """Sampled tokens of the requests whose `samples` flag was set, in scheduled order: host
    copies, on CUDA still being written when `execute` returns (`wait` for them)."""

    sampled: SamplerOutput | None
    num_encoded_items: int
    ready: torch.cuda.Event | None = None  # recorded after the copies to the host

    def wait(self) -> SamplerOutput | None:
        """The sampled tokens, once the step that samples them is done (waits for it only, not
        for steps queued after it)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.sampled


class ModelRunner:
    """Invariant: once allocated, the KV cache, the input buffers' device side and the graph
    logits never move (the decode graphs hold their addresses)."""

    def __init__(self, config: GpuWorkerConfig, info: ModelInfo, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, info, self.device)
        text = info.hf_config.get_text_config()
        backend = attention_backend(self.device, self.dtype, head_dim_of(text))
        logger.info("attention backend: %s", type(backend).__name__)
        self.model = build_model(
            info, backend, self.dtype, self.device, config.load_format, config.seed
        )
        self.sampler = Sampler(config.seed)
        self.num_layers: int = text.num_hidden_layers
        self.kv_caches: list[torch.Tensor] = []  # [2, num_blocks, block_size, kv_heads, head_dim]
        self.num_encoded_items = 0  # items run through the encoder (the encoder cache saves runs)
        max_tokens, max_reqs = config.max_num_batched_tokens, config.max_num_seqs
        self.max_blocks_per_req = -(-max_model_len // config.block_size)
        self.buffers = InputBuffers(
            max_tokens,
            max_reqs,
            self.max_blocks_per_req,
            config.block_size,
            self.model.uses_mrope,
            self.device,
        )
        self._arange = np.arange(max(max_tokens, max_reqs) + 1, dtype=np.int64)
        on_cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if on_cuda else None
        self._copy_done = torch.cuda.Event() if on_cuda else None
        # The last step's sampled token ids (on the device) and each sampling request's row:
        # the next step's pending tokens (async scheduling) are read from here.
        self._last_sampled: torch.Tensor | None = None
        self._last_sample_rows: dict[Request, int] = {}
        self.graphs: DecodeGraphs | None = None
        if on_cuda and not config.enforce_eager:
            if isinstance(backend, TorchAttentionBackend):
                logger.info("no CUDA graphs: the torch attention backend cannot be captured")
            else:
                self.graphs = DecodeGraphs(capture_sizes(max_reqs, max_tokens))
                # Every graph writes its logits here; allocated now, so the profile counts it.
                self._graph_logits = torch.empty(
                    self.graphs.sizes[-1], text.vocab_size, dtype=self.dtype, device=self.device
                )

    # ---- KV cache ----

    def _kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        text = self.model.config.get_text_config()
        num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return (2, num_blocks, self.config.block_size, num_kv_heads, head_dim_of(text))

    def kv_block_bytes(self) -> int:
        return math.prod(self._kv_cache_shape(1)) * self.dtype.itemsize * self.num_layers

    def num_kv_blocks_to_allocate(self) -> int:
        """Blocks that fit the memory budget, capped at what max_num_seqs full-length requests
        can use (+1 null block): a small model on a big GPU would otherwise get millions of
        blocks, and as many Python objects in the block pool for the GC to walk every step."""
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            budget = self._profile_kv_budget_bytes()
            if budget < 2 * self.kv_block_bytes():
                raise ConfigError(
                    f"no GPU memory left for the KV cache ({budget / GiB:.2f} GiB after the "
                    "profile step); raise --gpu-memory-utilization or lower "
                    "--max-num-batched-tokens / --max-num-seqs"
                )
        else:
            budget = self.config.kv_cache_memory_gb * GiB
        usable = self.config.max_num_seqs * self.max_blocks_per_req + 1
        return max(2, min(usable, int(budget // self.kv_block_bytes())))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = self._kv_cache_shape(num_blocks)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)
        ]

    # ---- one step ----

    @torch.inference_mode()
    def execute(
        self, sched: SchedulerOutput, kv: KVCacheManager, encoder_cache: EncoderCache
    ) -> StepResult:
        # The record_function ranges name the step's phases in torch.profiler traces
        # (bench/offline.py --profile); outside a profiler they cost about a microsecond.
        num_encoded = len(sched.encoder_inputs)
        with record_function("runner.prepare"):
            items = self._stage_items([req.mm_items[i] for req, i in sched.encoder_inputs])
            # Built while the media copies are in flight.
            inputs = self._prepare_inputs(sched, kv) if sched.scheduled else None
            # Pending tokens are always the previous step's: only the next step may read them.
            self._last_sampled, self._last_sample_rows = None, {}
        with record_function("runner.encode"):
            self._run_encoders(sched, items, encoder_cache)
        if inputs is None:
            return StepResult(None, num_encoded)
        phase = "runner.decode_graph" if inputs.graph_size is not None else "runner.model"
        with record_function(phase):
            logits = self._run_model(inputs, encoder_cache)
        if logits is None:
            return StepResult(None, num_encoded)
        with record_function("runner.sample"):
            # Built after the forward is queued: this per-request host work then runs while the
            # GPU computes (before it, it measured 0.5-0.9 ms slower per decode step on an H100).
            samplers = [s.req for s in sched.scheduled if s.samples]
            batch = SamplingBatch.from_params(
                [r.sampling_params for r in samplers], [r.generator for r in samplers], self.device
            )
            sampled = self.sampler(logits, batch)
            # The next step, planned before these tokens reach the host, reads them from here.
            self._last_sampled = sampled.token_ids
            self._last_sample_rows = {req: row for row, req in enumerate(samplers)}
            result = StepResult(sampled.to_host(), num_encoded)
            if self.device.type == "cuda":
                result.ready = torch.cuda.Event()
                result.ready.record()
            return result

    def _stage_items(self, items: list[MMItem]) -> list[MMItem]:
        """The items with their pixels (uint8 images, or floats) on the device, sent from pinned
        memory on the copy stream; the encoder waits for them (`_encode`), the CPU does not.
        Other integer tensors (grids, sizes) are metadata the host reads: on the device, reading
        one would wait for every step queued before it."""
        if not items or self._copy_stream is None:
            return items
        # A destination may reuse memory that work queued on the main stream still reads.
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        staged = []
        for item in items:
            tensors = {}
            for key, tensor in (item.tensors or {}).items():
                if not (tensor.is_floating_point() or tensor.dtype == torch.uint8):
                    tensors[key] = tensor
                    continue
                host = tensor if tensor.is_pinned() else tensor.pin_memory()
                # Allocated on the main stream, which uses and frees it.
                tensors[key] = torch.empty_like(host, device=self.device)
                with torch.cuda.stream(self._copy_stream):
                    tensors[key].copy_(host, non_blocking=True)
            staged.append(msgspec.structs.replace(item, tensors=tensors))
        self._copy_done.record(self._copy_stream)
        return staged

    def _encode(self, items: list[MMItem]) -> list[torch.Tensor]:
        if self._copy_done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copy_done)
        return self.model.encode(items)

    def _run_encoders(
        self, sched: SchedulerOutput, items: list[MMItem], encoder_cache: EncoderCache
    ) -> None:
        if not items:
            return
        outputs = self._encode(items)
        for (req, _), item, emb in zip(sched.encoder_inputs, items, outputs, strict=True):
            if emb.shape[0] != item.placeholder.length:
                raise RuntimeError(
                    f"encoder gave {emb.shape[0]} tokens for an item with "
                    f"{item.placeholder.length} placeholders (req {req.req_id})"
                )
            encoder_cache.put(item.mm_hash, emb, req.req_id)
        self.num_encoded_items += len(items)

    def _prepare_inputs(self, sched: SchedulerOutput, kv: KVCacheManager) -> StepInputs:
        """The batch layout, computed with numpy over the whole batch; the only per-request
        work is copying block table rows, token id slices and media overlaps."""
        buf = self.buffers
        buf.wait_until_copied()
        scheduled = sched.scheduled
        num_reqs = len(scheduled)
        starts = np.fromiter((s.start for s in scheduled), np.int64, num_reqs)
        num_new = np.fromiter((s.num_new_tokens for s in scheduled), np.int64, num_reqs)
        samples = np.fromiter((s.samples for s in scheduled), bool, num_reqs)
        cu_num_tokens = np.cumsum(num_new)  # [num_reqs]
        num_tokens = int(cu_num_tokens[-1])
        mm_segments, num_pending = self._write_requests(sched, cu_num_tokens, kv)
        graph_size = self._graph_size(num_tokens, num_reqs, bool(mm_segments))

        req_idx = np.repeat(self._arange[:num_reqs], num_new)  # [num_tokens]: each one's request
        token_pos = _token_positions(starts, num_new, cu_num_tokens, self._arange)
        bs = self.config.block_size
        slots = buf.block_tables.array[req_idx, token_pos // bs] * bs + token_pos % bs
        buf.slot_mapping.array[:num_tokens] = slots
        positions = buf.positions_np(graph_size or num_tokens)
        if buf.mrope:
            query_start = np.concatenate(([0], cu_num_tokens))
            self.model.write_mrope_positions(
                scheduled, query_start, token_pos, positions[:, :num_tokens]
            )
        else:
            positions[:num_tokens] = token_pos
        buf.query_start_loc.array[0] = 0
        buf.query_start_loc.array[1 : num_reqs + 1] = cu_num_tokens
        buf.seq_lens.array[:num_reqs] = starts + num_new
        sample_rows = (cu_num_tokens - 1)[samples]
        buf.logits_indices.array[: len(sample_rows)] = sample_rows
        if graph_size is not None:  # a decode step: num_tokens == num_reqs
            buf.pad_decode(num_reqs, graph_size)
        inputs = buf.send(
            graph_size or num_tokens,
            graph_size or num_reqs,
            len(sample_rows),
            int(num_new.max()),
            int(buf.seq_lens.array[:num_reqs].max()),
            sample_first_rows=len(sample_rows) == num_tokens,
        )
        if num_pending:
            assert self._last_sampled is not None, "pending tokens without a previous step"
            buf.fill_pending_ids(num_pending, self._last_sampled)
        inputs.mm_segments, inputs.graph_size = mm_segments, graph_size
        return inputs

    def _write_requests(
        self, sched: SchedulerOutput, cu_num_tokens: np.ndarray, kv: KVCacheManager
    ) -> tuple[list[tuple[str, str, int, int, int]], int]:
        """Writes the per-request parts of the layout (block table rows, known token ids, where
        the pending ones go); returns the step's media slices and the number of pending ids."""
        buf = self.buffers
        mm_segments: list[tuple[str, str, int, int, int]] = []
        num_pending = 0
        for i, s in enumerate(sched.scheduled):
            block_ids = kv.block_ids(s.req.req_id)
            buf.block_tables.array[i, : len(block_ids)] = block_ids
            if s.req.mm_items and s.start < s.req.num_prompt_tokens:
                base = int(cu_num_tokens[i]) - s.num_new_tokens
                mm_segments += _media_overlaps(s.req.req_id, s.req.mm_items, s.start, s.end, base)
            if s.end > s.req.num_tokens:  # its last input is the token the last step samples
                buf.pending_rows.array[num_pending] = cu_num_tokens[i] - 1
                buf.pending_sources.array[num_pending] = self._last_sample_rows[s.req]
                num_pending += 1
        num_tokens = int(cu_num_tokens[-1])
        ids = buf.input_ids.array[:num_tokens]
        known = chain.from_iterable(s.req.token_ids[s.start : s.end] for s in sched.scheduled)
        if num_pending == 0:
            ids[:] = np.fromiter(known, np.int64, num_tokens)
        elif num_pending < num_tokens:  # else a decode step with every input pending
            is_known = np.ones(num_tokens, dtype=bool)
            is_known[buf.pending_rows.array[:num_pending]] = False
            ids[is_known] = np.fromiter(known, np.int64, num_tokens - num_pending)
        return mm_segments, num_pending

    def _graph_size(self, num_tokens: int, num_reqs: int, has_media: bool) -> int | None:
        """The captured size to replay: decode steps only (one token per request, no media)."""
        if self.graphs is None or has_media or num_tokens != num_reqs:
            return None
        return self.graphs.padded_size(num_reqs)

    def _run_model(
        self, inputs: StepInputs, encoder_cache: EncoderCache | None
    ) -> torch.Tensor | None:
        """Logits [num_sampling, vocab] of the sampling rows; None when no row samples."""
        if inputs.graph_size is not None:
            assert self.graphs is not None
            self.graphs.replay(inputs.graph_size)
            rows = self._graph_logits  # [max graph size, vocab]
        else:
            embeds = self.model.embed(inputs.input_ids)  # [num_tokens, hidden]
            for req_id, mm_hash, lo, hi, dst in inputs.mm_segments:
                assert encoder_cache is not None
                encoder_cache.acquire(mm_hash, req_id)
                embeds[dst : dst + hi - lo] = encoder_cache.get(mm_hash)[lo:hi]
            rows = self.model(embeds, inputs.positions, self.kv_caches, inputs.meta)
        if inputs.num_sampling == 0:
            return None
        if inputs.logits_indices is None:
            rows = rows[: inputs.num_sampling]
        else:
            rows = rows.index_select(0, inputs.logits_indices)
        return rows if inputs.graph_size is not None else self.model.compute_logits(rows)

    # ---- memory profile and CUDA graphs (CUDA only) ----

    @torch.inference_mode()
    def _profile_kv_budget_bytes(self) -> int:
        """What `gpu_memory_utilization` of the device leaves for the KV cache after a
        worst-case step, as vLLM's `Worker.determine_available_memory`:
        total * utilization - peak torch memory of the profile step (weights included)
        - memory outside torch's allocator (CUDA context, cuBLAS, other processes)
        - encoder cache space the profile did not fill - the decode graphs (measured).
        """
        config, device = self.config, self.device
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        weights_bytes = torch.cuda.memory_allocated(device)
        # The encoder outputs stay alive through the LM step, as the encoder cache holds them.
        encoder_budget = min(config.encoder_budget_per_step, config.encoder_cache_size)
        encoder_outputs = self._encode(
            self._stage_items(self.model.dummy_encoder_items(encoder_budget))
        )
        num_encoder_tokens = sum(out.shape[0] for out in encoder_outputs)
        num_lm_tokens = self._profile_lm_step()
        torch.cuda.synchronize(device)
        peak_bytes = torch.cuda.max_memory_allocated(device)
        del encoder_outputs
        gc.collect()
        torch.cuda.empty_cache()
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        hidden_size = self.model.config.get_text_config().hidden_size
        unfilled_tokens = max(0, config.encoder_cache_size - num_encoder_tokens)
        taken = {  # what the KV cache cannot have
            "peak": peak_bytes,
            "non-torch": total_bytes - free_bytes - torch.cuda.memory_reserved(device),
            "rest of the encoder cache": unfilled_tokens * hidden_size * self.dtype.itemsize,
            "CUDA graphs": self._profile_graph_bytes() if self.graphs is not None else 0,
        }
        budget = total_bytes * config.gpu_memory_utilization - sum(taken.values())
        logger.info(
            "memory profile (%d LM tokens, %d encoder tokens): %.2f GiB x %.2f utilization; "
            "weights %.2f GiB, %s -> KV cache %.2f GiB",
            num_lm_tokens,
            num_encoder_tokens,
            total_bytes / GiB,
            config.gpu_memory_utilization,
            weights_bytes / GiB,
            ", ".join(f"{name} {size / GiB:.2f} GiB" for name, size in taken.items()),
            budget / GiB,
        )
        return int(budget)

    @contextmanager
    def _one_block_kv_cache(self) -> Iterator[None]:
        """Profile runs come before the KV cache exists: every layer writes its K/V into one
        shared block (garbage values; the shapes and memory of everything else are real)."""
        block = torch.zeros(self._kv_cache_shape(1), dtype=self.dtype, device=self.device)
        self.kv_caches = [block] * self.num_layers
        try:
            yield
        finally:
            self.kv_caches = []

    def _profile_lm_step(self) -> int:
        """The LM at max_num_batched_tokens tokens (prefills of at most max_model_len each),
        then the LM head and the sampler on max_num_seqs rows; returns the token count."""
        config, buf = self.config, self.buffers
        num_tokens = min(config.max_num_batched_tokens, config.max_num_seqs * self.max_model_len)
        seq_len = min(num_tokens, self.max_model_len)
        num_seqs = -(-num_tokens // seq_len)
        seq_lens = np.full(num_seqs, seq_len, dtype=np.int64)
        seq_lens[-1] = num_tokens - seq_len * (num_seqs - 1)
        starts = np.zeros_like(seq_lens)
        token_pos = _token_positions(starts, seq_lens, np.cumsum(seq_lens), self._arange)
        num_sampling = min(config.max_num_seqs, num_tokens)

        buf.input_ids.array[:num_tokens] = 0
        buf.positions_np(num_tokens)[...] = token_pos  # M-RoPE: text positions in all three
        buf.slot_mapping.array[:num_tokens] = token_pos % config.block_size
        buf.query_start_loc.array[0] = 0
        buf.query_start_loc.array[1 : num_seqs + 1] = np.cumsum(seq_lens)
        buf.seq_lens.array[:num_seqs] = seq_lens
        buf.block_tables.array[:num_seqs] = 0
        buf.logits_indices.array[:num_sampling] = self._arange[
            num_tokens - num_sampling : num_tokens
        ]
        inputs = buf.send(num_tokens, num_seqs, num_sampling, seq_len, seq_len)
        with self._one_block_kv_cache():
            logits = self._run_model(inputs, None)
        assert logits is not None
        batch = SamplingBatch.from_params(
            [PROFILE_SAMPLING] * num_sampling, [None] * num_sampling, self.device
        )
        Sampler(config.seed)(logits.float(), batch)  # its own generator: ours stays unused
        return num_tokens

    def _profile_graph_bytes(self) -> int:
        """The decode graphs' memory: the largest one's pool, measured by capturing it against
        a one-block cache (the smaller graphs share its pool, with some growth), plus what
        every graph takes outside the pool."""
        assert self.graphs is not None
        with self._one_block_kv_cache():
            self._dummy_decode_inputs()
            pool_bytes = graph_pool_bytes(self._decode_forward, self.graphs.sizes[-1])
        return int(pool_bytes * GRAPH_POOL_GROWTH) + len(self.graphs.sizes) * GRAPH_BYTES

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        """Captures the decode graphs (after the KV cache is allocated: they bake in its
        addresses). A no-op without CUDA graphs."""
        if self.graphs is None:
            return
        assert self.kv_caches, "allocate the KV cache first"
        self._dummy_decode_inputs()
        self.graphs.capture(self._decode_forward)

    def warm_up(self) -> None:
        """What the model builds on first use, built now (CUDA): no step waits for it."""
        if self.device.type == "cuda":
            start = time.perf_counter()
            self.model.warm_up()
            logger.info("encoder warm-up in %.2f s", time.perf_counter() - start)

    def _dummy_decode_inputs(self) -> None:
        """Every row of the largest decode batch a dummy, until a step writes it."""
        assert self.graphs is not None
        largest = self.graphs.sizes[-1]
        self.buffers.wait_until_copied()
        self.buffers.query_start_loc.array[0] = 0
        self.buffers.pad_decode(0, largest)
        self.buffers.send(largest, largest, 0, 1, self.max_model_len)

    def _decode_forward(self, size: int) -> None:
        """What a decode graph of `size` requests runs, reading the input buffers."""
        buf = self.buffers
        meta = buf.metadata(size, size, 1, self.max_model_len)  # upper bounds: any decode step
        embeds = self.model.embed(buf.input_ids.gpu[:size])  # [size, hidden]
        hidden = self.model(embeds, buf.positions_view(size), self.kv_caches, meta)
        self._graph_logits[:size].copy_(self.model.compute_logits(hidden))


def _token_positions(
    starts: np.ndarray, num_new: np.ndarray, cu_num_tokens: np.ndarray, arange: np.ndarray
) -> np.ndarray:
    """[num_tokens]: each token's index in its request (its 1-D position), for a flattened
    batch of chunks [starts[i], starts[i] + num_new[i])."""
    num_tokens = int(cu_num_tokens[-1])
    return np.repeat(starts - cu_num_tokens + num_new, num_new) + arange[:num_tokens]


def _media_overlaps(
    req_id: str, items: list[MMItem], start: int, end: int, base: int
) -> list[tuple[str, str, int, int, int]]:
    """The parts of the request's media items inside its chunk [start, end), whose first token
    is batch row `base`: (req_id, mm_hash, first item row, end item row, first batch row)."""
    segments = []
    for item in items:
        offset, length = item.placeholder.offset, item.placeholder.length
        lo, hi = max(start, offset), min(end, offset + length)
        if lo < hi:
            segments.append((req_id, item.mm_hash, lo - offset, hi - offset, base + lo - start))
    return segments
