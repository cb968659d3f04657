"""The CUDA attention backend: csrc/ kernels for the cache write and paged attention.

Reads only the device tensors of `AttentionMetadata` and shapes (never `max_seq_len` or
`max_query_len`, which are host values), and plans its tiles on the device once per step (the
first layer's call), so a decode step can be captured in a CUDA graph and replayed.
"""

import torch

from mm_runtime.gpu_worker import kernels, paged_attention
from mm_runtime.gpu_worker.layers.attention import AttentionBackend, AttentionMetadata
from mm_runtime.gpu_worker.layers.rotary import RotaryEmbedding


class CudaAttentionBackend(AttentionBackend):
    """bf16/fp16, head dims 16/32/64/80/128, any power-of-two block size, GQA."""

    @staticmethod
    def supports(dtype: torch.dtype, head_dim: int) -> bool:
        return (
            dtype in (torch.float16, torch.bfloat16) and head_dim in paged_attention.ATTN_HEAD_DIMS
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        kernels.write_kv_cache(k.contiguous(), v.contiguous(), kv_cache, meta.slot_mapping)
        return self._attend(q, kv_cache, meta, scale)

    def forward_qkv(
        self,
        qkv: torch.Tensor,
        rotary: RotaryEmbedding,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        num_heads: int,
    ) -> torch.Tensor:
        # One kernel for the split, rotary and cache write: at batch 1 the five it replaces
        # (three copies, rotary, cache write) were most of a decode layer's small kernels.
        q = kernels.rotary_kv_cache(qkv, *rope, kv_cache, meta.slot_mapping, num_heads)
        return self._attend(q, kv_cache, meta, scale)

    def _attend(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Paged attention of q over the cache, which holds the step's K/V already."""
        num_kv_heads = kv_cache.shape[3]
        if meta.backend_state is None:
            meta.backend_state = paged_attention.plan_attention(
                meta.query_start_loc,
                q.shape[0],
                q.shape[1] // num_kv_heads,
                num_kv_heads,
                meta.seq_lens,
            )
        plan = meta.backend_state
        return paged_attention.paged_attention(
            q.contiguous(),
            kv_cache,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            plan.tiles,
            scale,
            plan.num_splits,
            plan.rows,
        )
