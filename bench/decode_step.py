"""Decode step time against the memory floor, on one GPU with a real-size (dummy-weight) model.

For each batch size B: B text requests of --context prompt tokens are prefilled, then --steps
consecutive decode steps are timed as the engine runs them (scheduler, input preparation, the
model (a CUDA graph unless --enforce-eager), sampling and output bookkeeping: the whole
`EngineCore.step`, with the host's work for one step overlapping the GPU's for the step before,
as in serving); the step time is their total over their number.
The floor of one step is the bytes it must read, over the measured copy bandwidth: the language
model's weights (every layer, the final norm and the LM head; the embedding reads only B rows)
plus the K/V of every request's context.

    mm-runtime make-model-dir --config bench/configs/qwen2_vl_2b.json /tmp/qwen2-vl-2b
    python bench/decode_step.py --model /tmp/qwen2-vl-2b --batch-sizes 1 32 128
"""

import argparse
import json
import random
import statistics
import time

import torch
from attention_kernels import copy_bandwidth  # bench/ is the script dir on sys.path
from profiling import print_profile, profiled
from workload import markdown_table

from mm_runtime.gpu_worker.engine import EngineCore
from mm_runtime.shared.config import GpuWorkerConfig
from mm_runtime.shared.wire import EngineRequest, SamplingParams


def weight_bytes(engine: EngineCore) -> int:
    """Bytes of the language model's weights that one decode step reads."""
    model = engine.runner.model
    lm = model.language_model
    total = sum(p.numel() * p.element_size() for p in lm.layers.parameters())
    total += sum(p.numel() * p.element_size() for p in lm.norm.parameters())
    return total + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def kv_bytes_per_token(engine: EngineCore) -> int:
    return engine.runner.kv_block_bytes() // engine.config.block_size


def time_decode(
    engine: EngineCore, batch: int, context: int, steps: int, seed: int, profile: bool = False
) -> tuple[float, float | None]:
    """Mean ms of a decode step with `batch` requests at about `context` tokens over `steps`
    consecutive steps, and the median ms of its CUDA graph alone."""
    rng = random.Random(seed)
    vocab = engine.runner.model.config.get_text_config().vocab_size
    params = SamplingParams(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        ids = [rng.randrange(vocab) for _ in range(context)]
        engine.add_request(
            EngineRequest(req_id=f"b{batch}-{i}", prompt_token_ids=ids, sampling_params=params)
        )
    # Prefill until every request decodes (its prompt is in the cache).
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    for _ in range(3):  # warm-up: the first decode steps, and one step queued ahead
        engine.step()
    torch.cuda.synchronize()
    with profiled(profile) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if prof is not None:
        print(f"profile of {steps} decode steps at batch {batch}:")
        print_profile(prof, seconds)
    graph_ms = _graph_replay_ms(engine, batch, steps)  # before the aborts: the same KV state
    for req_id in list(engine.requests):
        engine.abort_request(req_id)
    while engine.has_unfinished_requests():
        engine.step()  # applies (drops) the step in flight
    return 1000 * seconds / steps, graph_ms


def _graph_replay_ms(engine: EngineCore, batch: int, iters: int) -> float | None:
    """Median ms of the decode graph alone (the GPU's part of the step), replayed on the last
    step's inputs; None in eager mode. The step minus this is host work the GPU waits for."""
    graphs = engine.runner.graphs
    if graphs is None:
        return None
    size = graphs.padded_size(batch)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphs.replay(size)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler summary of the largest batch"
    )
    args = parser.parse_args()
    config = GpuWorkerConfig(
        model=args.model,
        device="cuda",
        dtype="bfloat16",
        load_format=args.load_format,
        max_num_seqs=max(args.batch_sizes),
        max_model_len=args.context + args.steps + 64,
        enforce_eager=args.enforce_eager,
    )
    engine = EngineCore(config)
    copy_gbs = copy_bandwidth()
    weights = weight_bytes(engine)
    rows = []
    for batch in args.batch_sizes:
        profile = args.profile and batch == max(args.batch_sizes)
        ms, graph_ms = time_decode(engine, batch, args.context, args.steps, batch, profile)
        kv = batch * (args.context + args.steps // 2) * kv_bytes_per_token(engine)
        floor_ms = (weights + kv) / copy_gbs / 1e6
        rows.append(
            {
                "batch": batch,
                "ms": ms,
                "graph_ms": graph_ms,
                "floor_ms": floor_ms,
                "weights": weights,
                "kv": kv,
            }
        )
    print(
        f"device: {torch.cuda.get_device_name()}; copy {copy_gbs:.0f} GB/s; model {args.model}; "
        f"LM weights {weights / 1e9:.2f} GB; context {args.context}; "
        f"{'eager' if args.enforce_eager else 'CUDA graphs'}"
    )
    header = [
        "batch",
        "step",
        "of which the graph",
        "floor (weights + KV) / copy BW",
        "ratio",
        "graph / floor",
        "tokens/s",
    ]
    table = [
        [
            str(r["batch"]),
            f"{r['ms']:.2f} ms",
            "-" if r["graph_ms"] is None else f"{r['graph_ms']:.2f} ms",
            f"{r['floor_ms']:.2f} ms ({r['weights'] / 1e9:.2f} + {r['kv'] / 1e9:.2f} GB)",
            f"{r['ms'] / r['floor_ms']:.2f}x",
            "-" if r["graph_ms"] is None else f"{r['graph_ms'] / r['floor_ms']:.2f}x",
            f"{1000 * r['batch'] / r['ms']:.0f}",
        ]
        for r in rows
    ]
    print(markdown_table(header, table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_GBs": copy_gbs, "rows": rows, "model": args.model}, f, indent=1)


if __name__ == "__main__":
    main()
