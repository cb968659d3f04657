"""Paged attention kernels (csrc/attention.cu) against the hardware and torch, on one GPU.

(a) decode: effective bandwidth (K/V bytes read + q/out) of one decode step's attention over
    paged caches, against the measured device-to-device copy bandwidth (bytes read + written of
    a 2 GiB copy);
(b) prefill: causal attention TFLOP/s of one prompt (or a batch of prompts) read from the paged
    cache, against torch SDPA with the flash backend on the same shapes (contiguous K/V, GQA
    expanded beforehand and not timed).

Times are medians of CUDA-graph replays timed with CUDA events (launch gaps excluded, as for a
decode step that runs in a graph); inputs rotate over enough copies to defeat the 50 MB L2. The
tile plan (`plan_attention`) is made beforehand and not timed: the model makes it once a step,
for all its layers (gpu_worker/layers/cuda_attention.py), so a layer's attention is the kernel
and, for split contexts, the merge.

    python bench/attention_kernels.py [--json bench/results/attention.json] [--sweep-splits 1 2 4]
        [--rows 64|128]   (force the prefill tiles' rows; default: the plan's)
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from workload import markdown_table  # bench/ is the script dir on sys.path

from mm_runtime.gpu_worker import paged_attention as pa

BLOCK = 16
# name: (num_heads, num_kv_heads, head_dim)
MODELS = {"qwen2-vl-2b": (12, 2, 128), "qwen2-vl-7b": (28, 4, 128), "llava-1.5-7b": (32, 32, 128)}
L2_BYTES = 50 * 2**20


def time_graph(fn, reps: int = 50) -> float:
    """Median milliseconds of one `fn()` replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2**29, device="cuda")  # 2 GiB of float32
    dst = torch.empty_like(src)
    ms = time_graph(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() * 4 / ms / 1e6


def paged_inputs(
    seq_lens: list[int],
    query_lens: list[int],
    heads: tuple[int, int, int],
    dtype: torch.dtype,
    rows: int | None = None,
) -> dict:
    """A paged cache holding every sequence's context in shuffled blocks, plus the metadata."""
    num_heads, num_kv_heads, head_dim = heads
    needed = [-(-s // BLOCK) for s in seq_lens]
    num_blocks = 1 + sum(needed)
    perm = (torch.randperm(num_blocks - 1) + 1).tolist()
    width = max(needed)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int64)
    for i, n in enumerate(needed):
        tables[i, :n] = torch.tensor([perm.pop() for _ in range(n)])
    cache = torch.randn(2, num_blocks, BLOCK, num_kv_heads, head_dim, device="cuda").to(dtype)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], device="cuda")
    q = torch.randn(int(starts[-1]), num_heads, head_dim, device="cuda").to(dtype)
    lens = torch.tensor(seq_lens, device="cuda")
    # The model's plan (layers/cuda_attention.py), made once a step.
    group = num_heads // num_kv_heads
    plan = pa.plan_attention(starts, q.shape[0], group, num_kv_heads, lens, rows)
    return {
        "q": q,
        "kv_cache": cache,
        "query_start_loc": starts,
        "seq_lens": lens,
        "block_tables": tables.cuda(),
        "plan": plan,
    }


def run_paged(inputs: dict, num_splits: int | None = None) -> torch.Tensor:
    """One layer's paged attention on `inputs`, with the plan's splits or `num_splits`."""
    q, plan = inputs["q"], inputs["plan"]
    return pa.paged_attention(
        q,
        inputs["kv_cache"],
        inputs["query_start_loc"],
        inputs["seq_lens"],
        inputs["block_tables"],
        plan.tiles,
        q.shape[2] ** -0.5,
        num_splits or plan.num_splits,
        plan.rows,
    )


def decode_case(
    model: str, batch: int, context: int, copy_gbs: float, sweep: list[int] | None = None
) -> dict:
    heads = MODELS[model]
    num_heads, num_kv_heads, head_dim = heads
    kv_bytes = batch * context * num_kv_heads * head_dim * 2 * 2  # K and V, bf16
    copies = max(1, min(8, -(-2 * L2_BYTES // kv_bytes)))
    sets = [
        paged_inputs([context] * batch, [1] * batch, heads, torch.bfloat16) for _ in range(copies)
    ]
    # One graph runs every input set in turn, so no set is still in L2 when it comes round.
    ms = time_graph(lambda: [run_paged(s) for s in sets]) / copies
    qo_bytes = 2 * batch * num_heads * head_dim * 2
    gbs = (kv_bytes + qo_bytes) / ms / 1e6
    # The same with each split count of `sweep` forced (the plan picks one from shapes only).
    sweep_ms = {
        n: time_graph(lambda n=n: [run_paged(s, n) for s in sets]) / copies for n in sweep or []
    }
    return {
        "model": model,
        "batch": batch,
        "context": context,
        "ms": ms,
        "GB/s": gbs,
        "of_copy": gbs / copy_gbs,
        "num_splits": sets[0]["plan"].num_splits,
        "sweep_ms": sweep_ms,
    }


def prefill_case(model: str, batch: int, length: int, rows: int | None = None) -> dict:
    heads = MODELS[model]
    num_heads, num_kv_heads, head_dim = heads
    inputs = paged_inputs([length] * batch, [length] * batch, heads, torch.bfloat16, rows)
    ours_ms = time_graph(lambda: run_paged(inputs), reps=20)
    q = inputs["q"].view(batch, length, num_heads, head_dim).transpose(1, 2).contiguous()
    k = torch.randn(batch, num_heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def sdpa() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    sdpa_ms = time_graph(sdpa, reps=20)
    flops = 2 * batch * length * length * head_dim * num_heads  # causal: half of 4 N^2 D H
    return {
        "model": model,
        "batch": batch,
        "length": length,
        "rows": inputs["plan"].rows,
        "ours_ms": ours_ms,
        "ours_TFLOPs": flops / ours_ms / 1e9,
        "sdpa_ms": sdpa_ms,
        "sdpa_TFLOPs": flops / sdpa_ms / 1e9,
        "of_sdpa": sdpa_ms / ours_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write all rows to this file")
    parser.add_argument(
        "--sweep-splits",
        nargs="+",
        type=int,
        default=None,
        help="also time each decode case with these split counts forced",
    )
    parser.add_argument(
        "--rows",
        type=int,
        choices=[pa.ATTN_ROWS, pa.WIDE_ROWS],
        default=None,
        help="force the prefill tiles' query rows (default: the plan's tile_rows)",
    )
    args = parser.parse_args()
    if any(not 1 <= n <= pa.MAX_SPLITS for n in args.sweep_splits or []):
        parser.error(f"--sweep-splits: 1 to {pa.MAX_SPLITS}")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth()
    decode = [
        decode_case(m, b, c, copy_gbs, args.sweep_splits)
        for m, b, c in [
            ("qwen2-vl-2b", 1, 1024),
            ("qwen2-vl-2b", 1, 4096),
            ("qwen2-vl-2b", 1, 32768),
            ("qwen2-vl-2b", 32, 1024),
            ("qwen2-vl-2b", 128, 1024),
            ("qwen2-vl-2b", 128, 4096),
            ("qwen2-vl-7b", 32, 2048),
            ("qwen2-vl-7b", 128, 1024),
            ("llava-1.5-7b", 32, 1024),
            ("llava-1.5-7b", 128, 1024),
        ]
    ]
    prefill = [
        prefill_case(m, b, n, args.rows)
        for m, b, n in [
            ("qwen2-vl-2b", 1, 1024),
            ("qwen2-vl-2b", 1, 4096),
            ("qwen2-vl-2b", 1, 8192),
            ("qwen2-vl-2b", 8, 1024),
            ("qwen2-vl-7b", 1, 4096),
            ("llava-1.5-7b", 1, 2048),
            ("llava-1.5-7b", 4, 2048),
        ]
    ]
    print(f"device: {device}; copy bandwidth {copy_gbs:.0f} GB/s (read + write, 2 GiB)")
    print("(a) decode attention, bf16, block 16")
    header = ["model", "batch", "context", "time", "effective GB/s", "of copy"]
    table = [
        [r["model"], str(r["batch"]), str(r["context"]), f"{r['ms'] * 1e3:.1f} us"]
        + [f"{r['GB/s']:.0f}", f"{r['of_copy'] * 100:.0f} %"]
        for r in decode
    ]
    print(markdown_table(header, table))
    if args.sweep_splits:
        print("(a) with the split count forced (the plan's in the fourth column)")
        header = ["model", "batch", "context", "plan"] + [f"{n} splits" for n in args.sweep_splits]
        table = [
            [r["model"], str(r["batch"]), str(r["context"]), str(r["num_splits"])]
            + [f"{r['sweep_ms'][n] * 1e3:.1f} us" for n in args.sweep_splits]
            for r in decode
        ]
        print(markdown_table(header, table))
    print("(b) prefill attention (causal), bf16")
    header = ["model", "batch x length", "rows", "ours", "ours TFLOP/s"]
    header += ["SDPA flash", "SDPA TFLOP/s", "of SDPA"]
    table = [
        [r["model"], f"{r['batch']} x {r['length']}", str(r["rows"]), f"{r['ours_ms']:.3f} ms"]
        + [f"{r['ours_TFLOPs']:.0f}", f"{r['sdpa_ms']:.3f} ms", f"{r['sdpa_TFLOPs']:.0f}"]
        + [f"{r['of_sdpa'] * 100:.0f} %"]
        for r in prefill
    ]
    print(markdown_table(header, table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": device, "copy_GBs": copy_gbs, "decode": decode, "prefill": prefill},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
