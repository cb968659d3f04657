"""A batch's prefill tiles ordered by the keys they read (`paged_attention.tiles_by_keys`), so
the kernel, which runs the list from its end, starts the longest first. Device ops only, so
these run on the CPU; tests/gpu_worker/test_paged_attention.py pins the attention itself."""

import torch

from mm_runtime.gpu_worker.paged_attention import tiles_by_keys


def test_longest_tiles_run_first_across_requests() -> None:
    # Two prompts of 30 and 12 new tokens after 0 and 100 cached ones, 10 tokens a tile, plus
    # two unused entries (request -1), as attention_tiles lists them.
    query_start_loc = torch.tensor([0, 30, 42])
    seq_lens = torch.tensor([30, 112])
    tiles = torch.tensor(
        [[0, 0], [0, 10], [0, 20], [1, 0], [1, 10], [-1, 0], [-1, 0]], dtype=torch.int32
    )
    ordered = tiles_by_keys(tiles, query_start_loc, seq_lens, tokens_per_tile=10)
    run_order = ordered.flip(0).tolist()  # the kernel's order
    # Keys read: request 0's tiles 10, 20, 30; request 1's 110 and 112 (its last tile has 2).
    assert run_order[:5] == [[1, 10], [1, 0], [0, 20], [0, 10], [0, 0]]
    assert run_order[5:] == [[-1, 0], [-1, 0]]
    assert ordered.dtype == torch.int32 and ordered.is_contiguous()


def test_same_length_prompts_interleave() -> None:
    """Equal prompts: every request's last tile before any request's second to last."""
    query_start_loc = torch.tensor([0, 20, 40, 60])
    seq_lens = torch.tensor([20, 20, 20])
    tiles = torch.tensor([[r, s] for r in range(3) for s in (0, 10)], dtype=torch.int32)
    run_order = tiles_by_keys(tiles, query_start_loc, seq_lens, 10).flip(0)
    assert run_order[:3, 1].tolist() == [10, 10, 10]
    assert sorted(run_order[:3, 0].tolist()) == [0, 1, 2]
