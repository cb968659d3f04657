"""Paged attention: the metadata of one step, the backend interface, and the torch reference.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]. A
request's tokens live in the blocks of its block table; `slot_mapping` says where each new
token's K/V goes (block_id * block_size + offset). One forward call serves a flattened batch of
prefill chunks and decodes: queries of request i are tokens query_start_loc[i]:query_start_loc[i+1]
and attend causally to the first seq_lens[i] cached tokens (the new ones included).

The CUDA kernels (csrc/) implement the same `AttentionBackend` interface; `TorchAttentionBackend`
is the CPU path and their test oracle.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mm_runtime.gpu_worker.layers.rotary import RotaryEmbedding

# cuDNN's SDPA builds a new execution plan for every new shape (~30 ms on an H100), and the
# reference path's shapes change every step: keep to the kernels that need no plan.
_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step batch layout, shared by every layer. Built once per step by the model runner."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token
    query_start_loc: torch.Tensor  # [num_reqs + 1] int64, prefix sums of query lengths
    seq_lens: torch.Tensor  # [num_reqs] int64, context length after this step
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int64, padded with 0
    max_query_len: int
    max_seq_len: int
    # Filled lazily by the backend at the step's first layer (the torch path's gather indices
    # and mask, the CUDA path's paged_attention.AttentionPlan).
    backend_state: Any = None

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]


class AttentionBackend(ABC):
    """Writes the step's new K/V into the paged cache, then attends."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...

    def forward_qkv(
        self,
        qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        rotary: RotaryEmbedding,
        rope: tuple[torch.Tensor, torch.Tensor],  # the step's cos/sin (RotaryEmbedding.prepare)
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        num_heads: int,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Attention from the fused QKV projection: q and k rotated, then `forward`. A backend
        with a kernel doing the rotary and the cache write in one pass overrides this."""
        num_tokens = qkv.shape[0]
        num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, num_heads, head_dim)
        k = k.view(num_tokens, num_kv_heads, head_dim)
        v = v.view(num_tokens, num_kv_heads, head_dim)
        q, k = rotary.apply(q, k, *rope)
        return self.forward(q, k, v, kv_cache, meta, scale)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Reshape-and-cache: token t's K/V go to flat slot slot_mapping[t]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slot_mapping] = k
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slot_mapping] = v


class TorchAttentionBackend(AttentionBackend):
    """Reference: gathers each request's context into a padded batch and calls SDPA once.

    No Python loop over requests: the per-step gather indices and causal mask are built once
    from the metadata and reused by every layer.
    """

    def _prepare(self, meta: AttentionMetadata, block_size: int) -> dict[str, torch.Tensor]:
        device = meta.seq_lens.device
        max_q, max_s = meta.max_query_len, meta.max_seq_len
        query_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]  # [num_reqs]
        # Key slots of every request's context, padded to max_seq_len.
        key_pos = torch.arange(max_s, device=device)  # [max_s]
        block_idx = (key_pos // block_size).clamp(max=meta.block_tables.shape[1] - 1)
        key_slots = meta.block_tables[:, block_idx] * block_size + key_pos % block_size
        # Query i of request r sits at absolute position seq_len - query_len + i.
        q_idx = torch.arange(max_q, device=device)  # [max_q]
        q_valid = q_idx[None, :] < query_lens[:, None]  # [num_reqs, max_q]
        q_abs = (meta.seq_lens - query_lens)[:, None] + q_idx[None, :]  # [num_reqs, max_q]
        key_valid = key_pos[None, :] < meta.seq_lens[:, None]  # [num_reqs, max_s]
        mask = key_pos[None, None, :] <= q_abs[:, :, None]  # causal, [num_reqs, max_q, max_s]
        mask &= key_valid[:, None, :]
        mask[:, :, 0] |= ~q_valid  # padded query rows see one key, so softmax has no NaN
        return {
            "key_slots": key_slots,
            "key_valid": key_valid[:, :, None, None],
            "mask": mask[:, None],
            "q_valid": q_valid,
        }

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        block_size, num_kv_heads, head_dim = kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4]
        if meta.backend_state is None:
            meta.backend_state = self._prepare(meta, block_size)
        st = meta.backend_state
        num_heads = q.shape[1]
        padded_q = q.new_zeros(meta.num_reqs, meta.max_query_len, num_heads, head_dim)
        padded_q[st["q_valid"]] = q
        keys = kv_cache[0].view(-1, num_kv_heads, head_dim)[st["key_slots"]]  # [R, S, Hkv, D]
        values = kv_cache[1].view(-1, num_kv_heads, head_dim)[st["key_slots"]]
        # Slots past a request's seq_len are gathered only for padding: they hold stale K/V of
        # freed blocks (or block 0). Masking alone is not enough, since NaN * 0 is NaN: a request
        # that wrote NaN/inf there would leak into every later request padded over its blocks.
        keys = keys.masked_fill(~st["key_valid"], 0.0)
        values = values.masked_fill(~st["key_valid"], 0.0)
        groups = num_heads // num_kv_heads
        keys = keys.transpose(1, 2).repeat_interleave(groups, dim=1)  # [R, H, S, D]
        values = values.transpose(1, 2).repeat_interleave(groups, dim=1)
        with sdpa_kernel(_SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(
                padded_q.transpose(1, 2), keys, values, attn_mask=st["mask"], scale=scale
            )  # [R, H, Q, D]
        return out.transpose(1, 2)[st["q_valid"]]  # [num_tokens, H, D]


class Attention(nn.Module):
    """One layer's attention over the paged cache, through the configured backend."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, backend: AttentionBackend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.backend = backend

    def forward(
        self,
        qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        rotary: RotaryEmbedding,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        return self.backend.forward_qkv(
            qkv, rotary, rope, kv_cache, meta, self.scale, self.num_heads
        )
