"""CUDA graphs of decode steps for the GPU worker's model runner: one per batch size.

A decode step (one new token per request, no media) launches the same kernels every time, only
the contents of the input buffers change; replaying a captured graph saves the launch overhead
of every layer's kernels, which dominates small decode batches. As vLLM
(vllm/v1/worker/gpu_model_runner.py `capture_model`):
- sizes 1, 2, 4, then every multiple of 8 up to max_num_seqs (and max_num_seqs itself); a batch
  replays the smallest size that holds it, its extra rows padded with dummies by the runner;
- captured largest first, all in one memory pool: graphs never run concurrently, so each
  reuses the intermediate memory of the larger ones;
- outputs go to a buffer outside the pool that every size shares (the runner's), so the pool
  holds intermediates only.
"""

import bisect
import logging
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """Batch sizes to capture, ascending; the largest is the largest decode batch possible."""
    largest = min(max_num_seqs, max_num_batched_tokens)
    sizes = [size for size in (1, 2, 4, *range(8, largest + 1, 8)) if size <= largest]
    if sizes[-1] != largest:
        sizes.append(largest)
    return sizes


class DecodeGraphs:
    """Captured decode forwards by batch size. Invariant: every graph reads and writes the
    same buffers (by address) that `forward` used at capture, so those must never move."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sorted(sizes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # batch size -> graph

    def padded_size(self, num_reqs: int) -> int | None:
        """The smallest captured size that holds `num_reqs` requests; None if none does."""
        i = bisect.bisect_left(self.sizes, num_reqs)
        return self.sizes[i] if i < len(self.sizes) and self.sizes[i] in self.graphs else None

    def capture(self, forward: Callable[[int], None]) -> None:
        """Captures `forward(size)` for every size; each runs once eagerly first, so lazy state
        (kernel modules, cuBLAS handles and workspaces) is set up outside the capture."""
        start = time.perf_counter()
        free_before, _ = torch.cuda.mem_get_info()
        reserved_before = torch.cuda.memory_reserved()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self.graphs[size] = _capture(forward, size, pool)
        torch.cuda.synchronize()
        free_after, _ = torch.cuda.mem_get_info()
        logger.info(
            "captured %d CUDA graphs (batch sizes %d..%d) in %.1f s: pool %.0f MiB, "
            "device memory %.0f MiB",
            len(self.graphs),
            self.sizes[0],
            self.sizes[-1],
            time.perf_counter() - start,
            (torch.cuda.memory_reserved() - reserved_before) / 2**20,
            (free_before - free_after) / 2**20,
        )

    def replay(self, size: int) -> None:
        self.graphs[size].replay()


def graph_pool_bytes(forward: Callable[[int], None], size: int) -> int:
    """Device memory that the graph of `forward(size)` takes in a pool of its own: captured once,
    measured, dropped (for the memory profile, before the real buffers exist)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    reserved_before = torch.cuda.memory_reserved()
    graph = _capture(forward, size, None)  # the capture empties the cache the warm-up filled
    pool_bytes = torch.cuda.memory_reserved() - reserved_before
    del graph
    torch.cuda.empty_cache()
    return pool_bytes


def _capture(
    forward: Callable[[int], None], size: int, pool: tuple[int, int] | None
) -> torch.cuda.CUDAGraph:
    forward(size)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread's CUDA calls (e.g. pinning) cannot spoil the capture.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        forward(size)
    return graph
