"""csrc/attention.cu on randomized ragged batches, contexts of 1 to 32k tokens and forced key
splits, against a float64 reference (‖out - ref‖ / ‖ref‖ within the bf16/fp16 bounds of the
device tool's METHOD.md).

The cache starts as NaN and only the slots of each sequence's tokens are written, so a read of
any other slot (a stale block tail, a padded block-table entry, a wrong block) shows as NaN; the
output is poisoned the same way, so an unwritten element shows as NaN too. Fresh random inputs
for every case. test_attention.py runs the same backend through the shared backend tests.
"""

import random
from dataclasses import dataclass

import pytest
import torch

pytestmark = pytest.mark.gpu

REL_ERROR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
# (num_heads, num_kv_heads): Qwen2-VL-2B (group 6), Qwen2-VL-7B (7), LLaVA-7B (MHA), and others.
HEADS = [(12, 2), (28, 4), (32, 32), (16, 2), (8, 1), (14, 14), (64, 8)]


@dataclass
class Case:
    q: torch.Tensor  # [num_tokens, H, D]
    kv_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    seqs: list[tuple[int, int]]  # (num_cached, num_new)
    full_k: list[torch.Tensor]
    full_v: list[torch.Tensor]


def make_case(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    block_size: int = 16,
) -> Case:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = [c + n for c, n in seqs]
    needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = 1 + sum(needed) + 3
    pool = (torch.randperm(num_blocks - 1, device="cuda", generator=gen) + 1).tolist()
    tables = [[pool.pop() for _ in range(n)] for n in needed]
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    full_k, full_v = [], []
    for table, s in zip(tables, seq_lens, strict=True):
        k = torch.randn(s, num_kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
        v = torch.randn(s, num_kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
        pos = torch.arange(s, device="cuda")
        blocks = torch.tensor(table, device="cuda")[pos // block_size]
        cache[0, blocks, pos % block_size] = k
        cache[1, blocks, pos % block_size] = v
        full_k.append(k)
        full_v.append(v)
    width = max(needed) + 3  # padded with the null block 0, which holds NaN here
    padded = [t + [0] * (width - len(t)) for t in tables]
    query_lens = [n for _, n in seqs]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], num_heads, head_dim, device="cuda", generator=gen).to(dtype)

    def ints(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device="cuda")

    return Case(q, cache, ints(starts), ints(seq_lens), ints(padded), seqs, full_k, full_v)


def reference(case: Case, scale: float) -> torch.Tensor:
    out, start = [], 0
    for (cached, new), k, v in zip(case.seqs, case.full_k, case.full_v, strict=True):
        q = case.q[start : start + new].double()
        group = q.shape[1] // k.shape[1]
        kd = k.double().repeat_interleave(group, dim=1)
        vd = v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,shd->hqs", q, kd) * scale
        q_pos = cached + torch.arange(new, device="cuda")
        k_pos = torch.arange(k.shape[0], device="cuda")
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out.append(torch.einsum("hqs,shd->qhd", scores.softmax(-1), vd))
        start += new
    return torch.cat(out)


def run_kernel(
    case: Case, scale: float, num_splits: int | None = None, rows: int | None = None
) -> torch.Tensor:
    """paged_attention (rows None or ATTN_ROWS) or paged_decode (rows DECODE_ROWS)."""
    from mm_runtime.gpu_worker import paged_attention as pa

    num_kv_heads = case.kv_cache.shape[3]
    group = case.q.shape[1] // num_kv_heads
    rows = rows or pa.ATTN_ROWS
    tiles = pa.attention_tiles(case.query_start_loc, case.q.shape[0], group, rows)
    if num_splits is None:
        num_splits = pa.attention_splits(tiles, case.q.shape[0], num_kv_heads)
    torch.full((case.q.numel(),), float("nan"), dtype=case.q.dtype, device="cuda")  # poison
    return pa.paged_attention(
        case.q,
        case.kv_cache,
        case.query_start_loc,
        case.seq_lens,
        case.block_tables,
        tiles,
        scale,
        num_splits,
        rows,
    )


def check(case: Case, out: torch.Tensor, scale: float) -> None:
    assert torch.isfinite(out).all(), "NaN/inf in the output: unwritten element or stale slot"
    ref = reference(case, scale)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < REL_ERROR[case.q.dtype], f"relative error {err:.2e}"


def random_seqs(rng: random.Random, max_context: int) -> list[tuple[int, int]]:
    seqs = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.5:  # decode
            seqs.append((rng.randint(0, max_context), 1))
        elif kind < 0.8:  # a chunk after cached context, starting anywhere inside a block
            seqs.append((rng.randint(0, max_context), rng.randint(2, 300)))
        else:  # a fresh prefill
            seqs.append((0, rng.randint(1, 700)))
    return seqs


@pytest.mark.parametrize("seed", range(24))
def test_random_ragged_batches(seed: int) -> None:
    rng = random.Random(seed)
    dtype = (torch.bfloat16, torch.float16)[seed % 2]
    head_dim = (64, 80, 128, 16, 32)[seed % 5]
    num_heads, num_kv_heads = HEADS[seed % len(HEADS)]
    case = make_case(random_seqs(rng, 3000), num_heads, num_kv_heads, head_dim, dtype, seed)
    check(case, run_kernel(case, head_dim**-0.5), head_dim**-0.5)


@pytest.mark.parametrize("context", [1, 15, 16, 17, 63, 64, 65, 1000, 4097, 16384, 32768])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_contexts(context: int, dtype: torch.dtype) -> None:
    """A decode batch at one context length (the query is token `context`), plus a prefill chunk
    of 100 queries ending there, for Qwen2-VL-2B's heads."""
    seqs = [(context - 1, 1), (context - 1, 1), (max(0, context - 100), min(100, context))]
    case = make_case(seqs, 12, 2, 128, dtype, seed=context)
    check(case, run_kernel(case, 128**-0.5), 128**-0.5)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 17, 64])
def test_forced_splits_agree(num_splits: int) -> None:
    """Any split count gives the same function, including splits left empty by short contexts."""
    seqs = [(5000, 1), (31, 1), (0, 1), (700, 40), (3, 200)]
    case = make_case(seqs, 28, 4, 128, torch.bfloat16, seed=num_splits)
    check(case, run_kernel(case, 0.1, num_splits), 0.1)


@pytest.mark.parametrize("seed", range(12))
def test_decode_kernel_on_decode_batches(seed: int) -> None:
    """paged_decode (16 query rows, three stages), as the backend runs steps of decodes only:
    contexts of 1 to 32k tokens, GQA groups of 1 to 16, key splits forced or as planned."""
    rng = random.Random(100 + seed)
    dtype = (torch.bfloat16, torch.float16)[seed % 2]
    head_dim = (128, 80, 64, 16, 32)[seed % 5]
    num_heads, num_kv_heads = [(12, 2), (28, 4), (32, 32), (16, 1), (8, 1), (64, 8)][seed % 6]
    contexts = [rng.choice([1, 15, 16, 17, 64, 65, 200, 1023, 4097, 32767]) for _ in range(7)]
    case = make_case([(c, 1) for c in contexts], num_heads, num_kv_heads, head_dim, dtype, seed)
    num_splits = (None, 1, 3, 64)[seed % 4]
    out = run_kernel(case, head_dim**-0.5, num_splits, rows=16)
    check(case, out, head_dim**-0.5)


@pytest.mark.parametrize("seed", range(6))
def test_decode_kernel_on_ragged_batches(seed: int) -> None:
    """paged_decode is the same function on any batch (the plan cuts chunks into tiles of 16 /
    group tokens), though the backend gives it decodes only."""
    rng = random.Random(200 + seed)
    num_heads, num_kv_heads = [(12, 2), (28, 4), (16, 16)][seed % 3]
    case = make_case(random_seqs(rng, 3000), num_heads, num_kv_heads, 128, torch.bfloat16, seed)
    check(case, run_kernel(case, 0.1, rows=16), 0.1)


@pytest.mark.parametrize("seed", range(10))
def test_wide_kernel_on_ragged_batches(seed: int) -> None:
    """paged_wide (128 query rows, 8 warps) on ragged batches of every head dim, dtype and GQA
    group, with key splits forced or as planned."""
    rng = random.Random(300 + seed)
    dtype = (torch.bfloat16, torch.float16)[seed % 2]
    head_dim = (128, 80, 64, 16, 32)[seed % 5]
    num_heads, num_kv_heads = HEADS[seed % len(HEADS)]
    case = make_case(random_seqs(rng, 3000), num_heads, num_kv_heads, head_dim, dtype, seed)
    num_splits = (None, 1, 3, 64)[seed % 4]
    check(case, run_kernel(case, 0.1, num_splits, rows=128), 0.1)


def test_plan_takes_16_row_tiles_for_steps_of_decodes_only() -> None:
    """Decodes only (as many tokens as requests) and a GQA group of at most 16: paged_decode's
    16-row tiles, one a request; a prefill chunk in the step, or a larger group: 64 rows."""
    from mm_runtime.gpu_worker import paged_attention as pa

    decodes = torch.arange(5, device="cuda")  # 4 requests of one query token
    plan = pa.plan_attention(decodes, 4, group=6, num_kv_heads=2)
    assert plan.rows == pa.DECODE_ROWS
    assert plan.tiles[:4, 0].tolist() == [0, 1, 2, 3] and plan.num_splits >= 1
    assert pa.plan_attention(decodes, 4, group=32, num_kv_heads=1).rows == pa.ATTN_ROWS
    mixed = torch.tensor([0, 1, 2, 300], device="cuda")  # two decodes and a 298-token chunk
    assert pa.plan_attention(mixed, 300, group=6, num_kv_heads=2).rows == pa.ATTN_ROWS


def test_tiles_list_every_query_once() -> None:
    from mm_runtime.gpu_worker import paged_attention as pa

    query_lens = [1, 64, 65, 10, 1, 0, 129] * 300  # over 1024 requests: the scan's chunks
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], device="cuda")
    for group in (1, 6, 7, 64):
        tiles = pa.attention_tiles(starts, int(starts[-1]), group).cpu()
        per_tile = 64 // group
        used = tiles[tiles[:, 0] >= 0]
        expected = [(r, s) for r, n in enumerate(query_lens) for s in range(0, n, per_tile)]
        assert [tuple(t) for t in used.tolist()] == expected
        assert (tiles[len(expected) :, 0] == -1).all()
