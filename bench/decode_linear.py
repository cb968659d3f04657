"""A decode layer's projections at a few token rows, against the memory floor, on one GPU.

At batch 1 to 4 a decode step is four weight reads a layer (QKV, O, gate-up, down): its time is
how close each projection gets to streaming its weight at the copy rate. For each projection of
a real-size model's layer shape and each token count, this times cuBLAS (`F.linear`, after the
separate RMSNorm where the layer has one) and the runtime's path (`gpu_worker.models.decoder`'s
choice: csrc/gemv.cu, with the norm and the activation fused where the layer has them), as
CUDA-graph replays of 20 calls over rotating weight copies (so the 50 MB L2 holds none of them),
and prints the weight bytes over the time against the copy bandwidth (bytes read + written of a
2 GiB copy). `--sweep` also times every launch shape csrc/gemv.cu is built for (weight rows a
warp, loads a lane a row, warps sharing K) and prints the fastest against `gemv_shape`'s pick.

    python bench/decode_linear.py [--tokens 1 2 4] [--models qwen2-vl-2b qwen2-vl-7b] [--sweep]
"""

import argparse

import torch
import torch.nn.functional as F
from attention_kernels import copy_bandwidth, time_graph  # bench/ is the script dir on sys.path
from workload import markdown_table

from mm_runtime.gpu_worker import kernels

# name: (hidden, intermediate, q heads, kv heads, head_dim, qkv bias)
MODELS = {
    "qwen2-vl-2b": (1536, 8960, 12, 2, 128, True),
    "qwen2-vl-7b": (3584, 18944, 28, 4, 128, True),
    "llava-1.5-7b": (4096, 11008, 32, 32, 128, False),
}
CALLS = 20  # calls a replay, each on the next weight copy
ROTATE_BYTES = 256 * 2**20  # weight copies of at least this much in all: 5x the H200's L2


def projections(model: str) -> list[tuple[str, int, int, bool, bool]]:
    """(name, N, K, normed before, SiLU-and-mul after) of one decoder layer."""
    hidden, inter, heads, kv_heads, head_dim, _ = MODELS[model]
    qkv = (heads + 2 * kv_heads) * head_dim
    return [
        ("qkv", qkv, hidden, True, False),
        ("o", hidden, heads * head_dim, False, False),
        ("gate_up", 2 * inter, hidden, True, True),
        ("down", hidden, inter, False, False),
    ]


def launch_shapes() -> list[kernels.GemvShape]:
    return [
        kernels.GemvShape(rows, vecs, parts)
        for rows, vecs in kernels.GEMV_SHAPES
        for parts in (1, 2, 4, 8)
    ]


def time_replays(fn, reps: int = 30) -> float:
    """Median ms of one call of `fn(i)` for i in range(CALLS), replayed from a CUDA graph."""
    return time_graph(lambda: [fn(i) for i in range(CALLS)], reps) / CALLS


def bench_projection(
    n: int, k: int, normed: bool, silu: bool, tokens: int, sweep: bool
) -> dict[str, float]:
    """Microseconds of one projection by cuBLAS (norm, linear, activation as separate kernels),
    by the runtime's path and (with `sweep`) by csrc/gemv.cu at each launch shape."""
    dtype, dev = torch.bfloat16, "cuda"
    copies = max(2, -(-ROTATE_BYTES // (n * k * 2)))
    weights = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for _ in range(copies)]
    x = torch.randn(tokens, k, device=dev, dtype=dtype)
    residual = torch.randn(tokens, k, device=dev, dtype=dtype)
    norm_weight = torch.ones(k, device=dev, dtype=dtype)

    def cublas(i: int) -> None:
        h = x
        if normed:
            h = F.rms_norm(x + residual, (k,), norm_weight, 1e-6)
        out = F.linear(h, weights[i % copies])
        if silu:
            out = F.silu(out[:, : n // 2]) * out[:, n // 2 :]

    def gemv(i: int, shape: kernels.GemvShape | None = None) -> None:
        w = weights[i % copies]
        if normed:
            kernels.norm_linear(x, residual, norm_weight, 1e-6, w, None, silu, shape)
        else:
            kernels.small_linear(x, w, None, shape)

    # The decoder's choice: csrc/gemv.cu for 1-2 rows (kernels.GEMV_MAX_TOKENS), else cuBLAS.
    fits = kernels.gemv_fits(x, weights[0])
    us = {"cublas": time_replays(cublas) * 1e3}
    us["runtime"] = time_replays(gemv) * 1e3 if fits else us["cublas"]
    if sweep and fits:
        for shape in launch_shapes():
            key = f"r{shape.rows} v{shape.vecs} p{shape.parts}"
            us[key] = time_replays(lambda i, s=shape: gemv(i, s)) * 1e3
    return us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=["qwen2-vl-2b", "qwen2-vl-7b"])
    parser.add_argument("--sweep", action="store_true", help="every csrc/gemv.cu launch shape")
    args = parser.parse_args()
    sms = kernels.num_sms(torch.device("cuda"))
    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {copy_gbs:.0f} GB/s (read + written)")
    for model in args.models:
        rows = []
        totals: dict[tuple[int, str], float] = {}
        for name, n, k, normed, silu in projections(model):
            for tokens in args.tokens:
                us = bench_projection(n, k, normed, silu, tokens, args.sweep)
                floor_us = n * k * 2 / copy_gbs / 1e3
                for path in ("cublas", "runtime"):
                    totals[tokens, path] = totals.get((tokens, path), 0.0) + us[path]
                row = [name, f"{n}x{k}", str(tokens)]
                row += [f"{us[p]:.1f} us ({floor_us / us[p]:.0%})" for p in ("cublas", "runtime")]
                if args.sweep and len(us) > 2:
                    picked = kernels.gemv_shape(n // 2 if silu else n, k, silu, sms)
                    swept = {p: t for p, t in us.items() if p not in ("cublas", "runtime")}
                    best = min(swept, key=swept.__getitem__)
                    row += [f"{best}: {swept[best]:.1f} us", str(picked)]
                    print(name, tokens, " ".join(f"{p}={t:.1f}" for p, t in swept.items()))
                elif args.sweep:
                    row += ["", ""]  # cuBLAS's rows: nothing swept
                rows.append(row)
        for tokens in args.tokens:
            row = ["layer", "", str(tokens)]
            row += [f"{totals[tokens, p]:.1f} us" for p in ("cublas", "runtime")]
            rows.append(row + (["", ""] if args.sweep else []))
        print(f"\n{model} (of copy: weight bytes / time against the copy rate)")
        header = ["projection", "N x K", "tokens", "cuBLAS", "runtime"]
        header += ["fastest shape", "gemv_shape's"] if args.sweep else []
        print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
