"""Runs one scheduled step: encoders for new media items, then the language model, then sampling.

Owns the model, the paged KV cache tensors and the sampler. Inputs of all scheduled requests are
flattened into one batch (no padding); encoder outputs are scattered into the input embeddings at
placeholder positions, sliced to the part of each item the chunk covers.
"""

import logging
from dataclasses import dataclass

import torch

from mm_runtime.gpu_worker.encoder_cache import EncoderCache
from mm_runtime.gpu_worker.kv_cache import KVCacheManager
from mm_runtime.gpu_worker.layers.attention import AttentionMetadata, TorchAttentionBackend
from mm_runtime.gpu_worker.models.decoder import head_dim_of
from mm_runtime.gpu_worker.models.loader import build_model
from mm_runtime.gpu_worker.sampler import Sampler, SamplerOutput, SamplingBatch
from mm_runtime.gpu_worker.scheduler import SchedulerOutput
from mm_runtime.shared.config import GpuWorkerConfig
from mm_runtime.shared.model_info import ModelInfo

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


@dataclass(slots=True)
class StepResult:
    """Sampled tokens of the requests whose `samples` flag was set, in scheduled order."""

    sampled: SamplerOutput | None
    num_encoded_items: int


class ModelRunner:
    def __init__(self, config: GpuWorkerConfig, info: ModelInfo) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, info, self.device)
        self.model = build_model(
            info, TorchAttentionBackend(), self.dtype, self.device, config.load_format, config.seed
        )
        self.sampler = Sampler(config.seed)
        self.kv_caches: list[torch.Tensor] = []
        self.num_encoded_items = 0  # items run through the encoder (the encoder cache saves runs)

    def kv_block_bytes(self) -> int:
        text = self.model.config.get_text_config()
        num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        per_token = 2 * num_kv_heads * head_dim_of(text) * self.dtype.itemsize
        return per_token * self.config.block_size * text.num_hidden_layers

    def num_kv_blocks_to_allocate(self, max_model_len: int) -> int:
        """Blocks that fit the memory budget, capped at what max_num_seqs full-length requests
        can use (+1 null block): a small model on a big GPU would otherwise get millions of
        blocks, and as many Python objects in the block pool for the GC to walk every step."""
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            free_bytes, total_bytes = torch.cuda.mem_get_info(self.device)
            used_bytes = total_bytes - free_bytes
            budget = total_bytes * self.config.gpu_memory_utilization - used_bytes
        else:
            budget = self.config.kv_cache_memory_gb * 2**30
        usable = self.config.max_num_seqs * -(-max_model_len // self.config.block_size) + 1
        return max(2, min(usable, int(budget // self.kv_block_bytes())))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        text = self.model.config.get_text_config()
        num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        shape = (2, num_blocks, self.config.block_size, num_kv_heads, head_dim_of(text))
        self.kv_caches = [
            torch.zeros(shape, dtype=self.dtype, device=self.device)
            for _ in range(text.num_hidden_layers)
        ]

    @torch.inference_mode()
    def execute(
        self, sched: SchedulerOutput, kv: KVCacheManager, encoder_cache: EncoderCache
    ) -> StepResult:
        self._run_encoders(sched, encoder_cache)
        if not sched.scheduled:
            return StepResult(None, len(sched.encoder_inputs))
        inputs_embeds, positions, meta, sample_idx = self._prepare_inputs(sched, kv, encoder_cache)
        hidden = self.model(inputs_embeds, positions, self.kv_caches, meta)
        if not sample_idx:
            return StepResult(None, len(sched.encoder_inputs))
        logits = self.model.compute_logits(hidden[sample_idx]).float()  # [num_sampling, vocab]
        samplers = [s.req for s in sched.scheduled if s.samples]
        batch = SamplingBatch.from_params(
            [r.sampling_params for r in samplers], [r.generator for r in samplers], self.device
        )
        return StepResult(self.sampler(logits, batch), len(sched.encoder_inputs))

    def _run_encoders(self, sched: SchedulerOutput, encoder_cache: EncoderCache) -> None:
        if not sched.encoder_inputs:
            return
        items = [req.mm_items[i] for req, i in sched.encoder_inputs]
        outputs = self.model.encode(items)
        for (req, _), item, emb in zip(sched.encoder_inputs, items, outputs, strict=True):
            if emb.shape[0] != item.placeholder.length:
                raise RuntimeError(
                    f"encoder gave {emb.shape[0]} tokens for an item with "
                    f"{item.placeholder.length} placeholders (req {req.req_id})"
                )
            encoder_cache.put(item.mm_hash, emb, req.req_id)
        self.num_encoded_items += len(items)

    def _prepare_inputs(
        self, sched: SchedulerOutput, kv: KVCacheManager, encoder_cache: EncoderCache
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.config.block_size
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        block_tables: list[list[int]] = []
        mm_dst: list[torch.Tensor] = []  # batch rows that take encoder outputs
        mm_src: list[torch.Tensor] = []  # the encoder output rows that go there
        sample_idx: list[int] = []
        query_start = [0]
        for s in sched.scheduled:
            req, base = s.req, len(input_ids)
            input_ids.extend(req.token_ids[s.start : s.end])
            positions.append(self.model.positions(req, s.start, s.end))
            table = kv.block_ids(req.req_id)
            block_tables.append(table)
            pos = torch.arange(s.start, s.end)
            slots.append(torch.tensor(table)[pos // bs] * bs + pos % bs)
            for item in req.mm_items:
                lo = max(s.start, item.placeholder.offset)
                hi = min(s.end, item.placeholder.offset + item.placeholder.length)
                if lo >= hi:
                    continue
                encoder_cache.acquire(item.mm_hash, req.req_id)
                emb = encoder_cache.get(item.mm_hash)
                mm_src.append(emb[lo - item.placeholder.offset : hi - item.placeholder.offset])
                mm_dst.append(torch.arange(base + lo - s.start, base + hi - s.start))
            query_start.append(len(input_ids))
            if s.samples:
                sample_idx.append(len(input_ids) - 1)

        dev = self.device
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        inputs_embeds = self.model.embed(ids)  # [num_tokens, hidden]
        if mm_src:
            inputs_embeds[torch.cat(mm_dst).to(dev)] = torch.cat(mm_src).to(inputs_embeds.dtype)
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], device=dev)
        seq_lens = [s.end for s in sched.scheduled]
        query_lens = [s.num_new_tokens for s in sched.scheduled]
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(dev),
            query_start_loc=torch.tensor(query_start, device=dev),
            seq_lens=torch.tensor(seq_lens, device=dev),
            block_tables=tables,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        return inputs_embeds, torch.cat(positions, dim=-1).to(dev), meta, sample_idx
