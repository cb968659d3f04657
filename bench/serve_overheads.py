"""Serving overheads in one run, on the tiny demo model (CPU by default): what the server path
costs per request, and what the feature cache buys end to end.

(a) Frontend overhead: the same request timed in-process through `mm_runtime.LLM` and through
    `mm-runtime serve` + the blocking SDK `Client` (max_tokens=1, greedy), median over
    --overhead-iters; the difference is what the frontend, the ZMQ hops, the preprocess pool
    and the SDK add. Cases: text only; one 640x480 JPEG, a new image each time (both sides
    preprocess it); the same image each time (the server hits its feature cache, `LLM` has none
    and preprocesses again). The two sides alternate call by call, never running together.
(b) Feature cache end to end: bench/load_test.py's workload at each --repeat-ratios (same N, seed
    and concurrency), each on a freshly started server so no run inherits another's caches, with
    the feature cache on and (for ratios > 0) off (--feature-cache-gb 0). A repeated image also
    hits the prefix cache (the image comes first in the prompt) or, without it, the encoder
    cache, so "off" rows isolate what the feature cache itself buys (no preprocessing, no tensor
    transfer); the counters printed beside each run say which cache did what.
(c) The micro benchmarks, not repeated here: bench/zmq_transfer.py (tensor transfer over ZMQ IPC)
    and bench/preprocess.py (decode + HF processor per image, per worker) run as subprocesses
    with small settings (--no-micro skips them) and their figures join the table; run them
    alone for their full tables.

On a small CPU machine run with OMP_NUM_THREADS=1: by default torch uses one intra-op thread per
core in the GPU worker (and in `LLM`), which then compete with the preprocess workers, the
frontend and anything else running; every parallel op waits for a descheduled thread (on the
2-core machine of bench/RESULTS.md, requests were ~25x slower).

    OMP_NUM_THREADS=1 python bench/serve_overheads.py --json overheads.json
    python bench/serve_overheads.py --device cuda --model DIR --no-micro
"""

import argparse
import asyncio
import gc
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from load_test import (
    ImageSource,
    ServerProcess,
    add_workload_args,
    build_workload,
    encode_image,
    run_info,
    run_load,
    summarize,
    synthetic_image,
)

from mm_runtime import LLM
from mm_runtime.frontend.sdk import Client
from mm_runtime.shared.model_info import ModelInfo
from mm_runtime.shared.tiny_models import tiny_model_dir
from mm_runtime.shared.wire import SamplingParams

BENCH_DIR = Path(__file__).resolve().parent
QUESTION = "What is in this image?"
# One case of part (a): a name, whether it has an image, whether that image is new each time.
CASES = [("text only", False, False), ("1 image, new", True, True), ("1 image, same", True, False)]
# Untimed first calls per case (lazy init in the engine and in each preprocess worker).
OVERHEAD_WARMUP_CALLS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_prompt(model_dir: str, with_image: bool) -> str:
    """A raw prompt in the model's own format (chatml for Qwen2-VL, USER/ASSISTANT for LLaVA)."""
    info = ModelInfo.from_model_dir(model_dir)
    image = info.image_placeholder if with_image else ""
    if info.model_type == "qwen2_vl":
        return f"<|im_start|>user\n{image}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    return f"USER: {image}\n{QUESTION} ASSISTANT:"


# ---- (a) frontend overhead ----


def case_inputs(model_dir: str, num_calls: int, seed: int) -> dict[str, list[tuple]]:
    """Per case, the (prompt, images) of every call, warm-up calls first; both sides get these.
    The "new" case's images are all distinct and used by no other call, so every one of them is
    a feature-cache miss on the server."""
    fresh = [
        encode_image(synthetic_image(640, 480, np.random.default_rng((seed, 7, i))), "jpeg")
        for i in range(num_calls)
    ]
    inputs = {}
    for name, with_image, new_each_time in CASES:
        prompt = raw_prompt(model_dir, with_image)
        inputs[name] = [
            (prompt, [fresh[i] if new_each_time else fresh[0]] if with_image else [])
            for i in range(num_calls)
        ]
    return inputs


def time_calls(
    llm: LLM, client: Client, calls: list[tuple], params: SamplingParams
) -> tuple[list[float], list[float]]:
    """Seconds per call (in-process, server), the two sides interleaved call by call in
    alternating order, so a change in the machine's load reaches both alike; the idle side
    uses no CPU meanwhile."""
    in_process: list[float] = []
    served: list[float] = []
    for i, (prompt, images) in enumerate(calls):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            if side == 0:
                request = {"prompt": prompt, "multi_modal_data": {"image": images}}
                llm.generate(request, params, use_tqdm=False)
                in_process.append(time.perf_counter() - start)
            else:
                client.generate(prompt, images or None, params)
                served.append(time.perf_counter() - start)
    return in_process, served


def frontend_overhead(args: argparse.Namespace) -> dict[str, object]:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    warmup = OVERHEAD_WARMUP_CALLS
    inputs = case_inputs(args.model, warmup + args.overhead_iters, args.seed)
    rows = []
    with server_process(args, "a") as server:
        # Loaded once the server is up and idle; the same engine settings as the server's.
        llm = LLM(args.model, device=args.device, enable_prefix_caching=not args.no_prefix_caching)
        with Client(server.address, timeout_s=120) as client:
            for name, calls in inputs.items():
                in_process, served = time_calls(llm, client, calls, params)
                llm_ms = [1e3 * t for t in in_process[warmup:]]
                server_ms = [1e3 * t for t in served[warmup:]]
                rows.append(
                    {
                        "case": name,
                        "in_process_ms": statistics.median(llm_ms),
                        "server_ms": statistics.median(server_ms),
                        "overhead_ms": statistics.median(server_ms) - statistics.median(llm_ms),
                        "in_process_all_ms": llm_ms,
                        "server_all_ms": server_ms,
                    }
                )
        del llm
        gc.collect()
        exit_code = server.stop()
    return {"iters": args.overhead_iters, "rows": rows, "server_exit_code": exit_code}


# ---- (b) feature cache end to end ----


def server_process(
    args: argparse.Namespace, tag: str, feature_cache_gb: float | None = None
) -> ServerProcess:
    """A fresh `mm-runtime serve` on a free port, started and healthy."""
    log = Path(tempfile.gettempdir()) / f"mm-runtime-overheads-{tag}.log"
    server_args = ["--model", args.model, "--device", args.device, *shlex.split(args.server_args)]
    if args.no_prefix_caching:
        server_args.append("--no-prefix-caching")
    if feature_cache_gb is not None:
        server_args += ["--feature-cache-gb", str(feature_cache_gb)]
    server = ServerProcess(f"tcp://127.0.0.1:{free_port()}", server_args, log)
    server.start()
    return server


def feature_cache_runs(args: argparse.Namespace) -> list[dict[str, object]]:
    """One run per (repeat ratio, feature-cache size); a cache of 0 GB stores nothing (every
    item is preprocessed and sent, though concurrent requests still share one job), which
    isolates the feature cache from the encoder and prefix caches. Ratio 0 runs once."""
    images = ImageSource(args.image_dir, args.image_format, args.seed)
    cases = [(r, gb) for r in args.repeat_ratios for gb in args.feature_cache_gb]
    cases = [(r, gb) for r, gb in cases if r > 0 or gb == args.feature_cache_gb[0]]
    runs = []
    for ratio, cache_gb in cases:
        workload = build_workload(
            args.num_requests, ratio, args.min_tokens, args.max_tokens, images, args.seed
        )
        with server_process(args, f"b{ratio}-{cache_gb}", cache_gb) as server:
            run = asyncio.run(
                run_load(
                    server.address,
                    workload,
                    args.request_rate,
                    args.concurrency,
                    args.seed,
                    args.warmup_requests,
                    progress=False,
                )
            )
            exit_code = server.stop()
        summary = summarize(workload, run)
        runs.append(
            {
                "repeat_ratio": ratio,
                "feature_cache_gb": cache_gb,
                "server_exit_code": exit_code,
                "summary": summary,
            }
        )
        print(
            f"  repeat {ratio:.0%}, feature cache {cache_gb:g} GB: "
            f"{summary['requests_per_s']:.2f} req/s, "
            f"TTFT p50 {summary['ttft_ms']['p50']:.1f} ms",  # type: ignore[index]
            flush=True,
        )
    return runs


# ---- (c) micro benchmarks ----


def micro_benchmarks(args: argparse.Namespace) -> dict[str, object]:
    """bench/zmq_transfer.py and bench/preprocess.py with small settings, read from their JSON."""
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "zmq_transfer": ["zmq_transfer.py", "--sizes-mib", "1", "16", "--total-mib", "256"],
            "preprocess": [
                "preprocess.py", "--model", args.model, "--sizes", "512", "1024",
                "--workers", "1", "2", "--seconds", "0.5",
            ],
        }  # fmt: skip
        for name, (script, *flags) in commands.items():
            cmd = [sys.executable, str(BENCH_DIR / script), *flags, "--json", f"{tmp}/{name}.json"]
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
            out[name] = {
                "command": shlex.join(["python", f"bench/{script}", *flags]),
                **json.loads(Path(f"{tmp}/{name}.json").read_text()),
            }
    return out


# ---- report ----


def print_report(report: dict) -> None:
    a = report["frontend_overhead"]
    print(f"\n(a) frontend overhead per request: max_tokens=1, median of {a['iters']} calls")
    print(f"{'case':<16}{'in-process LLM':>16}{'server + SDK':>14}{'overhead':>11}")
    for r in a["rows"]:
        print(
            f"{r['case']:<16}{r['in_process_ms']:>13.1f} ms{r['server_ms']:>11.1f} ms"
            f"{r['overhead_ms']:>+8.1f} ms"
        )
    b = report["feature_cache"]
    w = report["workload"]
    print(
        f"\n(b) feature cache end to end: {w['num_requests']} requests, concurrency "
        f"{w['concurrency']}, rate {w['request_rate']}, {w['min_tokens']}-{w['max_tokens']} "
        f"output tokens, {w['image_format']} images, seed {w['seed']}; a fresh server per row"
    )
    print(
        f"{'repeat':>6}{'fc GB':>6}{'req/s':>8}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p90':>10}"
        f"{'ITL p50':>9}{'prep jobs':>10}{'fc hits':>8}{'enc hits':>9}{'MiB sent':>9}"
    )
    for run in b:
        s, d = run["summary"], run["summary"]["counters_delta"]
        sent_mib = (d["mm_runtime_feature_cache_tensor_bytes_sent_total"] or 0) / 2**20
        print(
            f"{run['repeat_ratio']:>6.0%}{run['feature_cache_gb']:>6g}{s['requests_per_s']:>8.2f}"
            f"{s['output_tokens_per_s']:>10.1f}{s['ttft_ms']['p50']:>10.1f}"
            f"{s['ttft_ms']['p90']:>10.1f}{s['itl_ms']['p50']:>9.1f}"
            f"{d['preprocess_jobs_done']:>10.0f}{d['mm_runtime_feature_cache_hits_total']:>8.0f}"
            f"{d['mm_runtime_encoder_cache_hits_total']:>9.0f}{sent_mib:>9.1f}"
        )
    print("\n(c) micro benchmarks: bench/zmq_transfer.py, bench/preprocess.py")
    micro = report.get("micro")
    if not micro:
        print("  (skipped: --no-micro; run the scripts themselves)")
        return
    for r in micro["zmq_transfer"]["rows"]:
        print(
            f"  ZMQ IPC {r['size_mib']:>3} MiB tensor: {r['zmq_ipc_gbps']:.2f} GB/s "
            f"(torch copy_ {r['torch_copy_gbps']:.2f} GB/s, ratio {r['zmq_over_copy']:.2f})"
        )
    for r in micro["preprocess"]["rows"]:
        rates = ", ".join(f"N={n}: {v:.1f}" for n, v in r["images_per_s"].items())
        print(
            f"  preprocess {r['model']} {r['size']}px {r['format']:<4}: decode "
            f"{r['decode_ms']:.1f} ms + processor {r['processor_ms']:.1f} ms; img/s {rates}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="default: the tiny Qwen2-VL demo model")
    parser.add_argument("--device", default="cpu", help="for LLM and the server alike")
    parser.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="for LLM and the server: repeats then gain from the feature and encoder caches only",
    )
    parser.add_argument("--server-args", default="", help='more serve flags: --server-args="..."')
    parser.add_argument("--overhead-iters", type=int, default=20, help="(a): calls per case")
    add_workload_args(parser)
    parser.set_defaults(concurrency=8, min_tokens=8, max_tokens=32)
    parser.add_argument("--repeat-ratios", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument(
        "--feature-cache-gb",
        type=float,
        nargs="+",
        default=[4.0, 0.0],
        help="(b): run each repeat ratio with each size (0: the cache off)",
    )
    parser.add_argument("--no-micro", action="store_true", help="(c): skip the micro benchmarks")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    args.model = args.model or str(tiny_model_dir("qwen2_vl"))
    return args


def main() -> int:
    args = parse_args()
    report: dict[str, object] = {"run": run_info(), "model": args.model}
    report["workload"] = {
        k: getattr(args, k)
        for k in ("num_requests", "concurrency", "min_tokens", "max_tokens", "image_format")
    } | {"request_rate": str(args.request_rate), "seed": args.seed}
    report["command"] = shlex.join(["python", *sys.argv])
    print("(a) frontend overhead ...", flush=True)
    report["frontend_overhead"] = frontend_overhead(args)
    print("(b) feature cache end to end ...", flush=True)
    report["feature_cache"] = feature_cache_runs(args)
    if not args.no_micro:
        print("(c) micro benchmarks ...", flush=True)
        report["micro"] = micro_benchmarks(args)
    report["run"]["load_average_1m_end"] = os.getloadavg()[0]  # type: ignore[index]
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    exit_codes = [report["frontend_overhead"]["server_exit_code"]]  # type: ignore[index]
    exit_codes += [r["server_exit_code"] for r in report["feature_cache"]]  # type: ignore[attr-defined]
    failed = sum(r["summary"]["num_failed"] for r in report["feature_cache"])  # type: ignore[attr-defined]
    if any(exit_codes) or failed:
        print(f"FAILED: server exit codes {exit_codes}, {failed} failed requests")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
