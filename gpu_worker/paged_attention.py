"""Paged attention over the KV cache (csrc/attention.cu): the step's plan and the kernels.

`plan_attention` makes a step's plan once, on the device, from shapes and device tensors only
(a decode step's CUDA graph captures it): which kernel (64-row tiles for prefill chunks and mixed
steps, 128-row ones for prefill-heavy GQA steps, 16-row ones for steps of decodes only:
`tile_rows`), the list of query tiles, and how many CTAs split each tile's keys.
`paged_attention` runs it for one layer. The torch reference is
gpu_worker/layers/attention.py's TorchAttentionBackend; tests/gpu_worker/test_paged_attention.py
compares the two.
"""

import ctypes
from dataclasses import dataclass

import torch

from mm_runtime.gpu_worker.kernels import DTYPE_SUFFIX, KERNELS, num_sms, threads_per_row

_PTR = ctypes.c_void_p

ATTN_ROWS = 64  # query rows per CTA; ATTN_ROWS in csrc/attention.cu
DECODE_ROWS = 16  # query rows per CTA of paged_decode (steps of decodes only); DECODE_ROWS there
WIDE_ROWS = 128  # query rows per CTA of paged_wide (8 warps); WIDE_ROWS there
ATTN_THREADS = 128
ATTN_HEAD_DIMS = (16, 32, 64, 80, 128)
MAX_SPLITS = 64  # MERGE_MAX_SPLITS in csrc/attention.cu


class _AttentionParams(ctypes.Structure):
    """Mirror of csrc/attention.cu's AttentionParams (passed by value)."""

    _fields_ = [
        ("out", ctypes.c_void_p),
        ("partial_out", ctypes.c_void_p),
        ("partial_lse", ctypes.c_void_p),
        ("q", ctypes.c_void_p),
        ("kv_cache", ctypes.c_void_p),
        ("query_start_loc", ctypes.c_void_p),
        ("seq_lens", ctypes.c_void_p),
        ("block_tables", ctypes.c_void_p),
        ("tiles", ctypes.c_void_p),
        ("v_offset", ctypes.c_int64),
        ("num_tokens", ctypes.c_int32),
        ("num_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("max_blocks", ctypes.c_int32),
        ("block_size_log2", ctypes.c_int32),
        ("scale_log2", ctypes.c_float),
    ]


def attention_tiles(
    query_start_loc: torch.Tensor, num_tokens: int, group: int, rows: int = ATTN_ROWS
) -> torch.Tensor:
    """The step's query tiles [capacity, 2] int32 (request, first query token; request -1 for
    unused entries) of `rows` query rows (ATTN_ROWS, DECODE_ROWS or WIDE_ROWS), listed
    on the device. capacity = ceil(num_tokens / tokens_per_tile) + num_reqs bounds the count
    from shapes alone, so a CUDA graph can capture it."""
    assert query_start_loc.dtype == torch.int64 and 1 <= group <= rows
    num_reqs = query_start_loc.shape[0] - 1
    tokens_per_tile = rows // group
    capacity = -(-num_tokens // tokens_per_tile) + num_reqs
    tiles = torch.empty(capacity, 2, dtype=torch.int32, device=query_start_loc.device)
    args = [
        (tiles, _PTR),
        (query_start_loc, _PTR),
        (num_reqs, ctypes.c_int),
        (tokens_per_tile, ctypes.c_int),
        (capacity, ctypes.c_int),
    ]
    KERNELS.launch("attention_plan", (1, 1, 1), (1024, 1, 1), args)
    return tiles


def attention_splits(tiles: torch.Tensor, num_tokens: int, num_kv_heads: int) -> int:
    """How many CTAs share each tile's keys: as many as two CTAs an SM hold in one wave when the
    batch alone gives fewer than one an SM. Counts the tiles with work: at most one per query
    token, however many entries the plan has room for (its capacity has a spare per request).
    Depends on shapes only (CUDA graphs replay it); a CTA whose slice of a short context is
    empty exits at once."""
    sms = num_sms(tiles.device)
    ctas = min(tiles.shape[0], num_tokens) * num_kv_heads
    return 1 if ctas >= sms else max(1, min(MAX_SPLITS, 2 * sms // ctas))


@dataclass
class AttentionPlan:
    """A step's paged attention, the same for every layer (see `plan_attention`)."""

    tiles: torch.Tensor  # [capacity, 2] int32, as the kernel runs them (from the end)
    num_splits: int  # CTAs sharing each tile's keys
    rows: int  # query rows a tile: ATTN_ROWS, DECODE_ROWS (paged_decode) or WIDE_ROWS (paged_wide)


def tile_rows(num_tokens: int, num_reqs: int, group: int, num_kv_heads: int, sms: int) -> int:
    """The query rows of a step's tiles, from shapes alone: 16 (paged_decode) for a step of
    decodes only (as many tokens as requests) whose GQA group fits a warp's rows; 128
    (paged_wide, 8 warps sharing each K/V tile) for a prefill-heavy step of a GQA model: two
    waves of such CTAs or more, and at most a quarter of them a request's own (a decode, or a
    chunk's last tile); else 64. On an H200 (bench/RESULTS.md, sixth session), 128 rows ran
    Qwen2-VL-2B's 1 x 4096, 1 x 8192 and 8 x 1024 prefill 5-7 % faster and the 7B's 1 x 4096
    1 %; under two waves it ran slower (2B 1 x 1024: 21 %), and so did MHA (LLaVA's group of 1,
    4-5 %: its 64-row tiles already hold 64 tokens). Taken for every step past the waves test,
    it cost the offline benchmark 3 % (30.4 against 31.3 req/s): its mixed steps' decodes each
    held a one-CTA-an-SM tile with one warp of eight at work."""
    if num_tokens == num_reqs and group <= DECODE_ROWS:
        return DECODE_ROWS
    wide_tiles = -(-num_tokens // (WIDE_ROWS // group)) if group <= WIDE_ROWS else 0
    if group > 1 and wide_tiles * num_kv_heads >= 2 * sms and 4 * num_reqs <= wide_tiles:
        return WIDE_ROWS
    return ATTN_ROWS


def plan_attention(
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int64
    num_tokens: int,
    group: int,  # query heads a KV head
    num_kv_heads: int,
    seq_lens: torch.Tensor | None = None,  # [num_reqs] int64: orders a batch's prefill tiles
    rows: int | None = None,  # forces the tile size (tests, benchmarks); None: `tile_rows`
) -> AttentionPlan:
    """The step's plan (the same for every layer; a decode step's CUDA graph captures it): the
    tile size (`tile_rows`), the tiles, several requests' prefill tiles ordered by their keys
    (`seq_lens`), and the split count."""
    num_reqs = query_start_loc.shape[0] - 1
    if rows is None:
        sms = num_sms(query_start_loc.device)
        rows = tile_rows(num_tokens, num_reqs, group, num_kv_heads, sms)
    tiles = attention_tiles(query_start_loc, num_tokens, group, rows)
    if rows != DECODE_ROWS and num_reqs > 1 and seq_lens is not None:
        tiles = tiles_by_keys(tiles, query_start_loc, seq_lens, rows // group)
    return AttentionPlan(tiles, attention_splits(tiles, num_tokens, num_kv_heads), rows)


def tiles_by_keys(
    tiles: torch.Tensor,  # [capacity, 2] int32, from attention_tiles
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int64
    seq_lens: torch.Tensor,  # [num_reqs] int64
    tokens_per_tile: int,
) -> torch.Tensor:
    """The tiles sorted by how many keys they read, fewest first (unused entries before all):
    the kernel runs the list from its end, so the longest tiles of every request start first
    and the last wave holds the shortest (longest-processing-time-first). The plan alone lists
    each request's tiles in turn, so a batch of prompts ends on one request's long tiles beside
    idle SMs. A few small device ops, no host sync."""
    req = tiles[:, 0].long()
    r = req.clamp(min=0)
    query_len = query_start_loc[r + 1] - query_start_loc[r]
    start = tiles[:, 1].long()
    tokens = torch.clamp(query_len - start, max=tokens_per_tile)
    keys = torch.where(req >= 0, seq_lens[r] - query_len + start + tokens, -1)
    return tiles[torch.argsort(keys, stable=True)].contiguous()


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int64
    seq_lens: torch.Tensor,  # [num_reqs] int64
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int64
    tiles: torch.Tensor,  # from attention_tiles
    scale: float,
    num_splits: int = 1,
    rows: int = ATTN_ROWS,
) -> torch.Tensor:
    """Causal attention of every query over its request's cached context (the CUDA twin of
    TorchAttentionBackend after the cache write); [num_tokens, num_heads, head_dim]. `rows`:
    the tiles' query rows, as `attention_tiles` made them (DECODE_ROWS runs paged_decode,
    WIDE_ROWS paged_wide)."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    assert q.is_contiguous() and kv_cache.is_contiguous() and block_tables.is_contiguous()
    assert q.dtype == kv_cache.dtype and q.dtype in (torch.float16, torch.bfloat16)
    assert head_dim in ATTN_HEAD_DIMS and kv_cache.shape[4] == head_dim
    assert num_heads % num_kv_heads == 0 and block_size & (block_size - 1) == 0
    assert seq_lens.dtype == block_tables.dtype == torch.int64
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    partial_out = partial_lse = None
    if num_splits > 1:
        partial_out = torch.empty(num_splits, *q.shape, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(num_splits, num_tokens, num_heads, device=q.device)
    params = _AttentionParams(
        out.data_ptr(),
        0 if partial_out is None else partial_out.data_ptr(),
        0 if partial_lse is None else partial_lse.data_ptr(),
        q.data_ptr(),
        kv_cache.data_ptr(),
        query_start_loc.data_ptr(),
        seq_lens.data_ptr(),
        block_tables.data_ptr(),
        tiles.data_ptr(),
        kv_cache[0].numel(),
        num_tokens,
        num_heads,
        num_kv_heads,
        block_tables.shape[1],
        block_size.bit_length() - 1,
        scale * 1.4426950408889634,  # log2(e)
    )
    suffix = DTYPE_SUFFIX[q.dtype]
    row = head_dim + 8  # SMEM_PAD
    # rows -> (kernel, the kernel's STAGES, threads)
    kind, stages, threads = {
        ATTN_ROWS: ("attention", 2, ATTN_THREADS),
        DECODE_ROWS: ("decode", 3, ATTN_THREADS),
        WIDE_ROWS: ("wide", 2, 2 * ATTN_THREADS),
    }[rows]
    shared_bytes = (rows + 2 * stages * 64) * row * q.element_size()  # Q + the stages' K and V
    grid = (tiles.shape[0], num_kv_heads, num_splits)
    name = f"paged_{kind}_{suffix}_d{head_dim}"
    KERNELS.launch(name, grid, (threads, 1, 1), [(params, None)], shared_bytes)
    if num_splits > 1:
        args = [
            (out, _PTR),
            (partial_out, _PTR),
            (partial_lse, _PTR),
            (num_splits, ctypes.c_int),
            (num_tokens, ctypes.c_int),
            (num_heads, ctypes.c_int),
            (head_dim, ctypes.c_int),
        ]
        grid = (num_tokens, num_heads, 1)
        KERNELS.launch(f"attention_merge_{suffix}", grid, (threads_per_row(head_dim), 1, 1), args)
    return out
