"""Paged attention backends against a naive per-sequence reference; the oracle for CUDA kernels.

The reference keeps each sequence's K/V outside the cache and computes plain
softmax(Q K^T * scale) V with a causal mask, in float64, repeating KV heads for GQA (query head h
reads KV head h // (num_heads / num_kv_heads), as HF's `repeat_kv` does). Batches are ragged:
decodes (query length 1) mixed with prefill chunks whose queries start after cached context,
often inside a block, over random non-contiguous block tables padded with the null block 0.

The cache is poisoned with NaN before anything is written, so a backend that reads a slot nobody
wrote (a wrong slot, a stale tail past seq_len, a padded block-table entry) returns NaN.

A new backend joins `BACKENDS` (a CUDA kernel with `marks=pytest.mark.gpu`) and runs every test.
"""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from mm_runtime.gpu_worker.layers.attention import (
    AttentionBackend,
    AttentionMetadata,
    TorchAttentionBackend,
    write_kv_cache,
)
from mm_runtime.gpu_worker.layers.cuda_attention import CudaAttentionBackend

BLOCK_SIZE = 16
NUM_KV_HEADS = 2


@dataclass(frozen=True)
class BackendCase:
    make: Callable[[], AttentionBackend]
    device: str
    dtype: torch.dtype
    atol: float
    rtol: float


BACKENDS = [
    pytest.param(
        BackendCase(TorchAttentionBackend, "cpu", torch.float32, 2e-5, 1e-4), id="torch-cpu-fp32"
    ),
    pytest.param(
        BackendCase(TorchAttentionBackend, "cuda", torch.bfloat16, 2e-2, 2e-2),
        id="torch-cuda-bf16",
        marks=pytest.mark.gpu,
    ),
    pytest.param(
        BackendCase(CudaAttentionBackend, "cuda", torch.bfloat16, 2e-2, 2e-2),
        id="csrc-bf16",
        marks=pytest.mark.gpu,
    ),
    pytest.param(
        BackendCase(CudaAttentionBackend, "cuda", torch.float16, 3e-3, 3e-3),
        id="csrc-fp16",
        marks=pytest.mark.gpu,
    ),
]

# Each sequence: (num_cached_tokens, num_new_tokens). A query starts at position num_cached.
BATCHES = {
    "decodes": [(37, 1), (15, 1), (16, 1), (0, 1), (80, 1)],
    "prefills": [(0, 33), (0, 16), (0, 5)],
    "chunks_after_context": [(20, 13), (16, 16), (5, 40), (31, 2)],
    "mixed": [(30, 1), (0, 17), (45, 20), (7, 1), (63, 1), (3, 29), (100, 30)],
}


@dataclass
class Batch:
    """One step's inputs plus what the reference needs: every sequence's full K/V."""

    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim], the new tokens only
    v: torch.Tensor
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata
    seqs: list[tuple[int, int]]
    full_k: list[torch.Tensor]  # per sequence [seq_len, num_kv_heads, head_dim], cached + new
    full_v: list[torch.Tensor]
    block_tables: list[list[int]]  # unpadded

    def expected_cache(self) -> torch.Tensor:
        """The cache once the step's K/V are written: every token at its slot, the rest NaN."""
        cache = torch.full_like(self.kv_cache, float("nan"))
        for table, k, v in zip(self.block_tables, self.full_k, self.full_v, strict=True):
            write_by_position(cache, table, k, v, 0)
        return cache


def write_by_position(
    cache: torch.Tensor, table: list[int], k: torch.Tensor, v: torch.Tensor, start: int
) -> None:
    """Writes tokens start.. of a sequence through its block table (not via slot_mapping)."""
    positions = torch.arange(start, start + k.shape[0])
    block_ids = torch.tensor(table)[positions // BLOCK_SIZE].to(cache.device)
    offsets = (positions % BLOCK_SIZE).to(cache.device)
    cache[0, block_ids, offsets] = k
    cache[1, block_ids, offsets] = v


def make_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    head_dim: int,
    case: BackendCase,
    seed: int = 0,
    num_shared_blocks: int = 0,
) -> Batch:
    """Random Q/K/V and block tables; the cached part of every sequence is already in the cache.
    `num_shared_blocks`: every sequence's first blocks are sequence 0's (a prefix-cache hit)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in seqs]
    num_needed = [-(-s // BLOCK_SIZE) for s in seq_lens]
    num_blocks = 1 + sum(num_needed) + 7  # null block 0, plus some never used
    pool = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables: list[list[int]] = []
    for i, n in enumerate(num_needed):
        shared = tables[0][:num_shared_blocks] if i > 0 else []
        tables.append(shared + [pool.pop() for _ in range(n - len(shared))])

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(case.device, case.dtype)

    full_k = [randn(s, NUM_KV_HEADS, head_dim) for s in seq_lens]
    full_v = [randn(s, NUM_KV_HEADS, head_dim) for s in seq_lens]
    for i in range(1, len(seqs)):  # shared blocks hold the same tokens' K/V
        n = num_shared_blocks * BLOCK_SIZE
        assert seqs[i][0] >= n, "a shared block must be fully cached"
        full_k[i][:n], full_v[i][:n] = full_k[0][:n], full_v[0][:n]

    kv_cache = torch.full(
        (2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, head_dim),
        float("nan"),
        dtype=case.dtype,
        device=case.device,
    )
    slot_mapping = []
    for (num_cached, num_new), table, k, v in zip(seqs, tables, full_k, full_v, strict=True):
        write_by_position(kv_cache, table, k[:num_cached], v[:num_cached], 0)
        for pos in range(num_cached, num_cached + num_new):
            slot_mapping.append(table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)

    max_blocks = max(num_needed) + 2  # wider than needed: trailing entries are padding
    padded = [t + [0] * (max_blocks - len(t)) for t in tables]
    query_lens = [n for _, n in seqs]

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=case.device)

    meta = AttentionMetadata(
        slot_mapping=ints(slot_mapping),
        query_start_loc=ints([0, *torch.tensor(query_lens).cumsum(0).tolist()]),
        seq_lens=ints(seq_lens),
        block_tables=ints(padded),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, seqs, strict=True)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, seqs, strict=True)])
    q = randn(sum(query_lens), num_heads, head_dim)
    return Batch(q, new_k, new_v, kv_cache, meta, seqs, full_k, full_v, tables)


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_cached: int, scale: float
) -> torch.Tensor:
    """One sequence: q [Q, H, D] at positions num_cached.., k/v [S, Hkv, D] -> [Q, H, D]."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # [S, H, D]
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q, k) * scale  # [H, Q, S]
    q_pos = num_cached + torch.arange(q.shape[0], device=q.device)  # [Q]
    k_pos = torch.arange(k.shape[0], device=q.device)  # [S]
    scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(dim=-1), v)  # [Q, H, D]


def reference(batch: Batch, scale: float) -> torch.Tensor:
    out, start = [], 0
    for (num_cached, num_new), k, v in zip(batch.seqs, batch.full_k, batch.full_v, strict=True):
        out.append(naive_attention(batch.q[start : start + num_new], k, v, num_cached, scale))
        start += num_new
    return torch.cat(out)  # [num_tokens, H, D]


def assert_close(out: torch.Tensor, expected: torch.Tensor, case: BackendCase) -> None:
    assert torch.isfinite(out).all(), "NaN in the output: an unwritten slot was read"
    torch.testing.assert_close(out.double(), expected, atol=case.atol, rtol=case.rtol)


def assert_same_cache(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise, NaN included: written slots hold exactly their K/V, no other slot changed."""
    assert torch.equal(actual.isnan(), expected.isnan()), "a slot outside slot_mapping was written"
    written = ~expected.isnan()
    assert torch.equal(actual[written], expected[written])


# ---- the backend against the reference ----


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("batch_name", list(BATCHES))
@pytest.mark.parametrize("gqa_ratio", [1, 2, 4])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_matches_naive_reference(
    case: BackendCase, batch_name: str, gqa_ratio: int, head_dim: int
) -> None:
    batch = make_batch(
        BATCHES[batch_name], NUM_KV_HEADS * gqa_ratio, head_dim, case, seed=gqa_ratio
    )
    scale = head_dim**-0.5
    out = case.make().forward(batch.q, batch.k, batch.v, batch.kv_cache, batch.meta, scale)
    assert out.shape == batch.q.shape
    assert_close(out, reference(batch, scale), case)
    assert_same_cache(batch.kv_cache, batch.expected_cache())


@pytest.mark.parametrize("case", BACKENDS)
def test_shared_prefix_blocks(case: BackendCase) -> None:
    """Prefix-cache hits: several block tables point at the same physical first blocks."""
    seqs = [(40, 3), (32, 1), (35, 20), (33, 1)]
    batch = make_batch(seqs, 8, 64, case, seed=5, num_shared_blocks=2)
    assert len({t[0] for t in batch.block_tables}) == 1
    scale = 64**-0.5
    out = case.make().forward(batch.q, batch.k, batch.v, batch.kv_cache, batch.meta, scale)
    assert_close(out, reference(batch, scale), case)


@pytest.mark.parametrize("case", BACKENDS)
def test_metadata_shared_by_layers(case: BackendCase) -> None:
    """The model runner builds one metadata per step for all layers; whatever a backend caches
    in it from the first layer must serve the next layer's different K/V and cache."""
    seqs = BATCHES["mixed"]
    first = make_batch(seqs, 4, 64, case, seed=1)
    second = make_batch(seqs, 4, 64, case, seed=1)  # the same layout...
    gen = torch.Generator().manual_seed(2)
    for name in ("q", "k", "v"):  # ...other values, as a second layer has
        t = getattr(second, name)
        setattr(second, name, torch.randn(t.shape, generator=gen).to(t.device, t.dtype))
    starts = second.meta.query_start_loc.tolist()
    for i, (num_cached, _) in enumerate(seqs):
        second.full_k[i][num_cached:] = second.k[starts[i] : starts[i + 1]]
        second.full_v[i][num_cached:] = second.v[starts[i] : starts[i + 1]]
    backend, scale = case.make(), 64**-0.5
    meta = first.meta
    for batch in (first, second):
        out = backend.forward(batch.q, batch.k, batch.v, batch.kv_cache, meta, scale)
        assert_close(out, reference(batch, scale), case)
        assert_same_cache(batch.kv_cache, batch.expected_cache())


@pytest.mark.parametrize("case", BACKENDS)
def test_custom_scale(case: BackendCase) -> None:
    batch = make_batch(BATCHES["chunks_after_context"], 4, 64, case, seed=3)
    out = case.make().forward(batch.q, batch.k, batch.v, batch.kv_cache, batch.meta, 0.3)
    assert_close(out, reference(batch, 0.3), case)


# ---- the cache write ----


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_write_kv_cache_writes_exactly_slot_mapping(case: BackendCase, head_dim: int) -> None:
    num_blocks, num_tokens = 9, 50
    gen = torch.Generator().manual_seed(head_dim)
    shape = (2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, head_dim)
    cache = torch.full(shape, float("nan"), dtype=case.dtype, device=case.device)
    # Distinct random slots anywhere in the cache, not in order, across block boundaries.
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:num_tokens]
    k = torch.randn(num_tokens, NUM_KV_HEADS, head_dim, generator=gen).to(case.device, case.dtype)
    v = torch.randn(num_tokens, NUM_KV_HEADS, head_dim, generator=gen).to(case.device, case.dtype)
    write_kv_cache(k, v, cache, slots.to(case.device))
    block_ids, offsets = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    assert torch.equal(cache[0, block_ids, offsets], k)
    assert torch.equal(cache[1, block_ids, offsets], v)
    untouched = torch.ones(num_blocks, BLOCK_SIZE, dtype=torch.bool)
    untouched[block_ids, offsets] = False
    assert cache[:, untouched.to(case.device)].isnan().all()
