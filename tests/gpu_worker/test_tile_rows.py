"""Which paged-attention kernel a step takes (`paged_attention.tile_rows`), from shapes alone:
a CUDA graph replays the choice, so it may not depend on lengths. The kernels themselves are
pinned by tests/gpu_worker/test_paged_attention.py."""

from mm_runtime.gpu_worker.paged_attention import ATTN_ROWS, DECODE_ROWS, WIDE_ROWS, tile_rows

SMS = 132  # an H100 / H200


def test_decode_steps_take_the_16_row_kernel() -> None:
    assert tile_rows(32, 32, group=6, num_kv_heads=2, sms=SMS) == DECODE_ROWS
    assert tile_rows(1, 1, group=16, num_kv_heads=1, sms=SMS) == DECODE_ROWS
    # A group larger than a warp's 16 rows: the 64-row kernel, decodes or not.
    assert tile_rows(32, 32, group=32, num_kv_heads=1, sms=SMS) == ATTN_ROWS


def test_large_gqa_prefill_takes_the_wide_kernel() -> None:
    # Qwen2-VL-2B (12 heads, 2 KV heads): 128 rows hold 21 tokens; 4096 tokens make 196 tiles a
    # KV head, 392 CTAs, three waves of one CTA an SM.
    assert tile_rows(4096, 1, group=6, num_kv_heads=2, sms=SMS) == WIDE_ROWS
    assert tile_rows(8 * 1024, 8, group=6, num_kv_heads=2, sms=SMS) == WIDE_ROWS
    # Fewer than two waves (1024 tokens: 98 CTAs) stay on 64-row tiles, which fill the GPU.
    assert tile_rows(1024, 1, group=6, num_kv_heads=2, sms=SMS) == ATTN_ROWS
    # A few decodes beside a long chunk: still prefill-heavy.
    assert tile_rows(4096 + 3, 4, group=6, num_kv_heads=2, sms=SMS) == WIDE_ROWS


def test_steps_of_many_requests_keep_64_row_tiles() -> None:
    """300 decodes beside an 8000-token chunk: 396 wide tiles would fill the waves, but 301 of
    them would be one request's own (a decode in an 8-warp CTA, one warp at work)."""
    assert tile_rows(8300, 301, group=6, num_kv_heads=2, sms=SMS) == ATTN_ROWS


def test_mha_keeps_64_row_tiles() -> None:
    """LLaVA-1.5-7B (32 heads, no GQA) measured slower on 128-row tiles at every length."""
    assert tile_rows(4 * 2048, 4, group=1, num_kv_heads=32, sms=SMS) == ATTN_ROWS
