"""Online benchmark of the OpenAI-compatible HTTP API, driven by the official `openai` client.

The workload is bench/load_test.py's (VisionArena-like: one synthetic photo-like image of a
bench/workload.py IMAGE_SIZES size per request, sent as a JPEG data URL, a short question, output
lengths drawn from [--min-tokens, --max-tokens] with ignore_eos, greedy). For each of
--request-rates (req/s, Poisson arrivals; inf sends all at once) --num-requests requests, with
images of their own (no rate finds another's in a cache), stream through `openai.AsyncOpenAI`.
TTFT is the first content chunk, ITL the gaps between later content chunks (a chunk may hold
several tokens), TPOT (latency - TTFT) / (output tokens - 1), as in vLLM's
`benchmark_serving.py`. A markdown table and a PNG plot per run go to bench/results/.

--compare-sdk also sends every request of the workload sequentially through the ZMQ SDK
(`AsyncClient`, streaming) and through HTTP, alternating which goes first, after one warm-up pass
so both find the same caches warm; the median per-request difference (HTTP - SDK) of TTFT and
latency is the HTTP layer's own cost (JSON, base64 data URLs, SSE, the openai client).

    OMP_NUM_THREADS=1 python bench/serve_bench.py --start-server --server-args="--device cpu" \\
        --num-requests 32 --request-rates 4 inf --max-tokens 32 --compare-sdk
    python bench/serve_bench.py --base-url http://10.0.0.5:8000 --request-rates 1 2 4 8 inf
"""

import argparse
import asyncio
import base64
import itertools
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import openai
from load_test import (  # bench/ is the script dir on sys.path
    ImageSource,
    RequestResult,
    RequestSpec,
    ServerProcess,
    arrival_times_s,
    build_workload,
    run_info,
    run_one,
    summarize,
)
from serve_overheads import free_port
from workload import markdown_table

from mm_runtime.frontend.sdk import AsyncClient

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def http_messages(spec: RequestSpec) -> list[dict[str, object]]:
    url = "data:image/jpeg;base64," + base64.b64encode(spec.image).decode()
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": spec.question},
    ]
    return [{"role": "user", "content": content}]


async def run_http(client: openai.AsyncOpenAI, model: str, spec: RequestSpec) -> RequestResult:
    start = time.perf_counter()
    arrivals_s: list[float] = []  # when each chunk with content came
    result = RequestResult(ok=False)
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=http_messages(spec),  # type: ignore[arg-type]
            max_tokens=spec.output_len,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals_s.append(time.perf_counter())
            if chunk.usage is not None:
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.output_tokens = chunk.usage.completion_tokens
    except openai.APIError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency_s = time.perf_counter() - start
    result.ttft_s = arrivals_s[0] - start if arrivals_s else None
    result.itl_s = [b - a for a, b in itertools.pairwise(arrivals_s)]
    result.ok = True
    return result


async def run_rate(
    client: openai.AsyncOpenAI, model: str, workload: list[RequestSpec], rate: float, seed: int
) -> dict[str, object]:
    tasks = []
    start = time.perf_counter()
    for spec, send_s in zip(workload, arrival_times_s(len(workload), rate, seed), strict=True):
        await asyncio.sleep(max(0.0, start + send_s - time.perf_counter()))
        tasks.append(asyncio.ensure_future(run_http(client, model, spec)))
    results = await asyncio.gather(*tasks)
    run = {"results": results, "duration_s": time.perf_counter() - start, "before": {}}
    return summarize(workload, run | {"after": {}})


async def compare_sdk(
    client: openai.AsyncOpenAI, model: str, address: str, workload: list[RequestSpec]
) -> dict[str, float]:
    """Median per-request (HTTP - SDK) TTFT and latency, in ms, the requests one at a time."""
    diffs: dict[str, list[float]] = {"ttft_ms": [], "latency_ms": []}
    async with AsyncClient(address, timeout_s=600) as sdk:
        for spec in workload:  # warm-up pass: both paths then find the caches warm
            await run_one(sdk, spec)
        for i, spec in enumerate(workload):
            if i % 2 == 0:
                via_sdk, via_http = await run_one(sdk, spec), await run_http(client, model, spec)
            else:
                via_http, via_sdk = await run_http(client, model, spec), await run_one(sdk, spec)
            if not (via_sdk.ok and via_http.ok):
                raise SystemExit(f"compare-sdk request failed: {via_sdk.error or via_http.error}")
            diffs["ttft_ms"].append((via_http.ttft_s or 0.0) - (via_sdk.ttft_s or 0.0))
            diffs["latency_ms"].append(via_http.latency_s - via_sdk.latency_s)
    return {k: statistics.median(v) * 1e3 for k, v in diffs.items()}


def workload_for(args: argparse.Namespace, run: int) -> list[RequestSpec]:
    """Run k's requests: new images (seed + k), so no rate finds an earlier rate's in a cache."""
    seed = args.seed + 1000 * run
    images = ImageSource(None, "jpeg", seed)
    return build_workload(args.num_requests, 0.0, args.min_tokens, args.max_tokens, images, seed)


async def run_all(args: argparse.Namespace) -> dict[str, object]:
    client = openai.AsyncOpenAI(base_url=f"{args.base_url}/v1", api_key="none", max_retries=0)
    async with client:
        model = (await client.models.list()).data[0].id
        warm = ImageSource(None, "jpeg", args.seed + 10_000)  # images outside the workload
        for k in range(args.warmup_requests):
            await run_http(client, model, RequestSpec("Warm-up.", warm.get(k), -1, 2, False))
        rates = {}
        for i, rate in enumerate(args.request_rates):
            rates[rate] = await run_rate(client, model, workload_for(args, i), rate, args.seed)
            print(f"rate {rate:g}: {rates[rate]['num_completed']}/{args.num_requests} ok")
        overhead = None
        if args.compare_sdk:
            workload = workload_for(args, len(args.request_rates))
            overhead = await compare_sdk(client, model, args.address, workload)
    return {"model": model, "rates": rates, "http_overhead_ms": overhead}


# ---- report ----


def table(rates: dict[float, dict]) -> str:
    header = ["req/s (target)", "req/s", "out tok/s", "TTFT p50", "TTFT p99"]
    header += ["TPOT p50", "TPOT p99", "ITL p50", "ITL p99", "ok"]
    rows = []
    for rate, s in rates.items():
        row = [f"{rate:g}", f"{s['requests_per_s']:.2f}", f"{s['output_tokens_per_s']:.1f}"]
        for name in ("ttft_ms", "tpot_ms", "itl_ms"):
            row += [_ms(s[name]["p50"]), _ms(s[name]["p99"])]
        rows.append(row + [f"{s['num_completed']}/{s['num_requests']}"])
    return markdown_table(header, rows) + "\n\n(latencies in ms)"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot(rates: dict[float, dict], path: Path) -> None:
    import matplotlib  # the `bench` extra; only this function needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r:g}" for r in rates]
    x = range(len(labels))  # categorical: inf has no place on a numeric axis
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot(x, [s["output_tokens_per_s"] for s in rates.values()], "o-")
    axes[0].set_title("output tokens/s")
    for ax, name in zip(axes[1:], ("ttft_ms", "tpot_ms", "itl_ms"), strict=True):
        for q in ("p50", "p99"):
            ax.plot(x, [s[name][q] for s in rates.values()], "o-", label=q)
        ax.set_title(f"{name.removesuffix('_ms').upper()} (ms)")
        ax.legend()
    for ax in axes:
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(args: argparse.Namespace, out: dict[str, object]) -> str:
    info = run_info()
    text = f"# serve_bench {info['date']} (commit {info['commit']}, model {out['model']})\n\n"
    text += f"`{shlex.join(['python', 'bench/serve_bench.py', *args.argv])}`\n\n"
    text += table(out["rates"])  # type: ignore[arg-type]
    overhead = out["http_overhead_ms"]
    if overhead is not None:
        text += (
            f"\n\nHTTP layer vs SDK, median per request over {args.num_requests} sequential "
            f"requests: TTFT {overhead['ttft_ms']:+.2f} ms, "  # type: ignore[index]
            f"latency {overhead['latency_ms']:+.2f} ms"  # type: ignore[index]
        )
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"serve_bench-{datetime.now():%Y%m%d-%H%M%S}"
    stem.with_suffix(".md").write_text(text + "\n")
    plot(out["rates"], stem.with_suffix(".png"))  # type: ignore[arg-type]
    return text + f"\n\nwritten: {stem}.md, {stem}.png"


# ---- command line ----


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the HTTP API")
    parser.add_argument("--address", default="tcp://127.0.0.1:5570", help="SDK, for compare")
    parser.add_argument("--request-rates", type=float, nargs="+", default=[1, 4, math.inf])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-tokens", type=int, default=64, help="shortest output (capped)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest output")
    parser.add_argument("--warmup-requests", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-sdk", action="store_true", help="HTTP vs SDK, sequential")
    parser.add_argument("--start-server", action="store_true", help="run mm-runtime serve too")
    parser.add_argument(
        "--server-args", default="", help='serve flags, e.g. --server-args="--device cpu"'
    )
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    args.min_tokens = min(args.min_tokens, args.max_tokens)  # --max-tokens 32 alone works
    if args.min_tokens < 1 or any(r <= 0 for r in args.request_rates):
        parser.error("need --max-tokens >= 1 and positive --request-rates")
    return args


def wait_for_http(base_url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> int:
    args = parse_args()
    server = None
    if args.start_server:
        http_port = free_port()
        args.base_url = f"http://127.0.0.1:{http_port}"
        args.address = f"tcp://127.0.0.1:{free_port()}"
        server_args = [*shlex.split(args.server_args), "--port", str(http_port)]
        log = Path(tempfile.gettempdir()) / f"mm-runtime-serve-{os.getpid()}.log"
        server = ServerProcess(args.address, server_args, log)
        print(f"starting: {shlex.join(server.cmd)} (log: {log})")
        print(f"server healthy after {server.start():.1f} s")
    try:
        wait_for_http(args.base_url)
        out = asyncio.run(run_all(args))
    finally:
        if server is not None:
            server.stop()
    print(write_report(args, out))
    failed = sum(s["num_failed"] for s in out["rates"].values())  # type: ignore[attr-defined]
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
