"""Online load test of a running `mm-runtime serve` through the ZMQ SDK (`AsyncClient`).

Workload (VisionArena-like, like bench/offline.py): N chat requests, each one image and a short
question, output lengths drawn from [--min-tokens, --max-tokens] with ignore_eos and greedy
sampling. Images come from --image-dir or are synthetic and photo-like (a smooth upscaled random
image plus noise, so PNG/JPEG sizes resemble photos) at random VisionArena-like sizes
(336x336 .. 1920x1080). A fraction --repeat-ratio of the requests (never the first) reuses an
image an earlier request already sent: the feature cache's case. Unique image k depends only on
(seed, k) and the questions and lengths only on the seed, so runs at different repeat ratios
differ only in which requests repeat.

Requests arrive as a Poisson process at --request-rate (req/s; inf = all at once), capped at
--concurrency in flight if given (a closed loop when the rate is inf). Every request streams;
TTFT is the arrival of the first delta, inter-token latency (ITL) the gaps between later deltas
(a delta may hold several tokens), TPOT a request's (latency - TTFT) / (output tokens - 1), all
measured at the client. The server's counters (health stats) are read before and after.

    python bench/load_test.py --start-server --server-args "--device cpu" --num-requests 64
    python bench/load_test.py --address tcp://10.0.0.5:5570 --request-rate 4 --json out.json
"""

import argparse
import asyncio
import io
import json
import math
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm
from workload import IMAGE_SIZES, QUESTIONS  # bench/ is the script dir on sys.path

from mm_runtime.frontend.sdk import DEFAULT_ADDRESS, AsyncClient, Client
from mm_runtime.shared.errors import MMRuntimeError
from mm_runtime.shared.wire import SamplingParams

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
# Server-side counters (health stats) compared before and after the run.
COUNTERS = [
    "mm_runtime_requests_total",
    "mm_runtime_request_errors_total",
    "mm_runtime_preprocess_jobs_total",
    "mm_runtime_preprocess_seconds_total",
    "preprocess_jobs_done",  # the pool's count: jobs that ran (one per single-flight group)
    "preprocess_busy_seconds",
    "mm_runtime_feature_cache_hits_total",
    "mm_runtime_feature_cache_misses_total",
    "mm_runtime_feature_cache_tensor_bytes_sent_total",
    "mm_runtime_encoder_cache_hits_total",
    "mm_runtime_encoder_cache_misses_total",
    "mm_runtime_prefix_cache_queries_tokens_total",
    "mm_runtime_prefix_cache_hits_tokens_total",
]


@dataclass(slots=True)
class RequestSpec:
    question: str
    image: bytes
    image_id: int  # index of the unique image; a repeat shares it with an earlier request
    output_len: int
    repeated: bool


@dataclass(slots=True)
class RequestResult:
    ok: bool
    latency_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between deltas after the first
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


# ---- workload ----


def synthetic_image(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Photo-like pixels (as bench/preprocess.py's photo_like), so encoded sizes are realistic."""
    coarse = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    noise = rng.integers(-8, 9, smooth.shape, dtype=np.int16)
    return Image.fromarray((smooth + noise).clip(0, 255).astype(np.uint8))  # [height, width, 3]


def encode_image(image: Image.Image, image_format: str) -> bytes:
    out = io.BytesIO()
    if image_format == "jpeg":
        image.save(out, format="JPEG", quality=90)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


class ImageSource:
    """Unique image k: file k of --image-dir (shuffled by the seed), or a synthetic image drawn
    from (seed, k) alone, so the same k is the same image whatever the repeat ratio."""

    def __init__(self, image_dir: Path | None, image_format: str, seed: int) -> None:
        self.image_format = image_format
        self.seed = seed
        self.files: list[Path] = []
        if image_dir is not None:
            self.files = sorted(
                p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not self.files:
                raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {image_dir}")
            random.Random(seed).shuffle(self.files)

    def get(self, k: int) -> bytes:
        if self.files:
            if k == len(self.files):
                print(f"warning: only {k} images in the image dir; reusing them (more repeats)")
            return self.files[k % len(self.files)].read_bytes()
        rng = np.random.default_rng((self.seed, k))
        width, height = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        return encode_image(synthetic_image(width, height, rng), self.image_format)


def repeat_flags(num_requests: int, repeat_ratio: float, rng: random.Random) -> list[bool]:
    """Exactly round(ratio * n) repeats (the first request cannot be one), at random places."""
    num_repeats = min(round(repeat_ratio * num_requests), max(num_requests - 1, 0))
    repeats = set(rng.sample(range(1, num_requests), num_repeats))
    return [i in repeats for i in range(num_requests)]


def build_workload(
    num_requests: int,
    repeat_ratio: float,
    min_tokens: int,
    max_tokens: int,
    images: ImageSource,
    seed: int,
) -> list[RequestSpec]:
    text_rng = random.Random(seed)  # questions and lengths: the same for every repeat ratio
    repeat_rng = random.Random(seed + 1)
    unique: list[bytes] = []
    specs = []
    for repeated in repeat_flags(num_requests, repeat_ratio, repeat_rng):
        question = text_rng.choice(QUESTIONS)
        output_len = text_rng.randint(min_tokens, max_tokens)
        if repeated:
            image_id = repeat_rng.randrange(len(unique))
        else:
            image_id = len(unique)
            unique.append(images.get(image_id))
        specs.append(RequestSpec(question, unique[image_id], image_id, output_len, repeated))
    return specs


def arrival_times_s(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Send times from the start: a Poisson process (exponential gaps), or all 0 at rate inf."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed + 2)
    times, t = [], 0.0
    for _ in range(num_requests):
        times.append(t)
        t += rng.expovariate(request_rate)
    return times


# ---- running ----


def messages(spec: RequestSpec) -> list[dict[str, object]]:
    content = [
        {"type": "image_bytes", "image_bytes": spec.image},
        {"type": "text", "text": spec.question},
    ]
    return [{"role": "user", "content": content}]


async def run_one(client: AsyncClient, spec: RequestSpec) -> RequestResult:
    params = SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=True)
    start = last = time.perf_counter()
    result = RequestResult(ok=False)
    try:
        async for delta in client.stream(messages=messages(spec), sampling_params=params):
            now = time.perf_counter()
            if delta.token_ids:
                if result.ttft_s is None:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
            if delta.usage is not None:
                result.prompt_tokens = delta.usage.prompt_tokens
                result.output_tokens = delta.usage.completion_tokens
    except MMRuntimeError as e:
        result.error = f"{e.code}: {e}"
        return result
    result.latency_s = time.perf_counter() - start
    result.ok = True
    return result


async def server_counters(client: AsyncClient) -> dict[str, float | None]:
    stats = await client.health()
    return {name: stats.get(name) for name in COUNTERS}


async def warm_up(client: AsyncClient, num_requests: int, seed: int) -> None:
    """Requests with images outside the workload (their own seed), before the counters are read:
    first-call costs (lazy init in the workers) stay out of the figures."""
    images = ImageSource(None, "jpeg", seed + 10_000)
    for k in range(num_requests):
        spec = RequestSpec("Warm-up.", images.get(k), -1, 2, False)
        result = await run_one(client, spec)
        if not result.ok:
            raise SystemExit(f"warm-up request failed: {result.error}")


async def run_load(
    address: str,
    workload: list[RequestSpec],
    request_rate: float,
    concurrency: int | None,
    seed: int,
    num_warmup: int = 1,
    progress: bool = True,
) -> dict[str, object]:
    """Runs the workload; returns the per-request results, duration and counters."""
    async with AsyncClient(address, timeout_s=600) as client:
        await warm_up(client, num_warmup, seed)
        before = await server_counters(client)
        limit = asyncio.Semaphore(concurrency or len(workload) or 1)
        bar = tqdm(total=len(workload), desc="requests", disable=not progress)

        async def gated(spec: RequestSpec) -> RequestResult:
            async with limit:
                result = await run_one(client, spec)
            bar.update(1)
            return result

        tasks = []
        start = time.perf_counter()
        for spec, send_s in zip(
            workload, arrival_times_s(len(workload), request_rate, seed), strict=True
        ):
            await asyncio.sleep(max(0.0, start + send_s - time.perf_counter()))
            tasks.append(asyncio.ensure_future(gated(spec)))
        results = await asyncio.gather(*tasks)
        duration_s = time.perf_counter() - start
        bar.close()
        after = await server_counters(client)
    return {"results": results, "duration_s": duration_s, "before": before, "after": after}


# ---- summary ----


def percentiles_ms(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ms = np.asarray(values_s) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def counter_delta(before: dict, after: dict) -> dict[str, float | None]:
    return {
        k: None if before.get(k) is None or after.get(k) is None else after[k] - before[k]
        for k in COUNTERS
    }


def summarize(workload: list[RequestSpec], run: dict[str, object]) -> dict[str, object]:
    results: list[RequestResult] = run["results"]  # type: ignore[assignment]
    duration_s: float = run["duration_s"]  # type: ignore[assignment]
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    tpot_s = [
        (r.latency_s - r.ttft_s) / (r.output_tokens - 1)
        for r in ok
        if r.ttft_s is not None and r.output_tokens > 1
    ]
    return {
        "num_requests": len(results),
        "num_completed": len(ok),
        "num_failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "num_repeated": sum(s.repeated for s in workload),
        "num_unique_images": len({s.image for s in workload}),  # by content
        "image_mib_sent": sum(len(s.image) for s in workload) / 2**20,
        "duration_s": duration_s,
        "requests_per_s": len(ok) / duration_s,
        "input_tokens_per_s": sum(r.prompt_tokens for r in ok) / duration_s,
        "output_tokens_per_s": output_tokens / duration_s,
        "total_output_tokens": output_tokens,
        "ttft_ms": percentiles_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": percentiles_ms([gap for r in ok for gap in r.itl_s]),
        "tpot_ms": percentiles_ms(tpot_s),
        "latency_ms": percentiles_ms([r.latency_s for r in ok]),
        "counters_before": run["before"],
        "counters_after": run["after"],
        "counters_delta": counter_delta(run["before"], run["after"]),  # type: ignore[arg-type]
    }


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _fmt_counter(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value == int(value) else f"{value:.3f}"


def print_summary(s: dict[str, object]) -> None:
    print(
        f"requests  : {s['num_completed']}/{s['num_requests']} ok, {s['num_repeated']} repeated "
        f"images ({s['num_unique_images']} unique, {s['image_mib_sent']:.1f} MiB sent)"
    )
    for error in s["errors"]:  # type: ignore[attr-defined]
        print(f"  error   : {error}")
    print(
        f"throughput: {s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} output "
        f"tok/s, {s['input_tokens_per_s']:.1f} input tok/s over {s['duration_s']:.1f} s"
    )
    print(f"{'ms':<10}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}")
    for name in ("ttft", "itl", "tpot", "latency"):
        p = s[f"{name}_ms"]
        row = "".join(f"{_fmt(p[k]):>9}" for k in ("mean", "p50", "p90", "p99"))  # type: ignore[index]
        print(f"{name.upper():<10}{row}")
    columns = [s["counters_before"], s["counters_after"], s["counters_delta"]]
    print(f"{'server counter':<44}{'before':>14}{'after':>14}{'delta':>14}")
    for k in COUNTERS:
        values = "".join(f"{_fmt_counter(c[k]):>14}" for c in columns)  # type: ignore[index]
        print(f"{k.removeprefix('mm_runtime_'):<44}{values}")


# ---- the server as a child process ----


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--address must look like tcp://HOST:PORT, got {address!r}")
    return host, int(port)


class ServerProcess:
    """`mm-runtime serve` as a child process: started, waited for until healthy, and stopped
    with SIGINT as a user's Ctrl-C would; `stop` returns its exit code (0 is a clean stop)."""

    def __init__(self, address: str, server_args: list[str], log_path: Path) -> None:
        host, port = parse_address(address)
        self.address = address
        self.log_path = log_path
        self.cmd = [
            sys.executable, "-m", "mm_runtime.cli", "serve",
            "--host", host, "--zmq-port", str(port), *server_args,
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300) -> float:
        """Starts the server and waits for a healthy reply; returns the seconds it took."""
        start = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with Client(self.address, timeout_s=2) as client:
                    client.health()
                return time.monotonic() - start
            except MMRuntimeError:
                time.sleep(0.5)
        self.stop()
        raise SystemExit(f"the server was not healthy within {timeout_s} s:\n{self.tail()}")

    def stop(self, timeout_s: float = 60) -> int:
        """SIGINT, then wait; a server that does not stop in time is killed (exit code -9)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def tail(self, num_lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-num_lines:])

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def run_info() -> dict[str, object]:
    """Where and when: commit (and whether the tree differs from it), CPUs, load average."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "working_tree_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),  # torch's intra-op threads
        "python": platform.python_version(),
    }


# ---- command line ----


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The workload's options (also used by bench/serve_overheads.py)."""
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=math.inf, help="req/s (Poisson)")
    parser.add_argument("--concurrency", type=int, default=None, help="max requests in flight")
    parser.add_argument("--min-tokens", type=int, default=16, help="shortest output")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest output")
    parser.add_argument("--image-dir", type=Path, default=None, help="default: synthetic")
    parser.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg")
    parser.add_argument("--warmup-requests", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="the server's SDK address")
    add_workload_args(parser)
    parser.add_argument("--repeat-ratio", type=float, default=0.0, help="0..1")
    parser.add_argument("--start-server", action="store_true", help="run mm-runtime serve too")
    parser.add_argument(
        "--server-args", default="", help='serve flags, e.g. --server-args="--device cpu"'
    )
    parser.add_argument("--server-log", type=Path, default=None, help="default: a temp file")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if not 0.0 <= args.repeat_ratio <= 1.0:
        parser.error("--repeat-ratio must be in [0, 1]")
    if not 1 <= args.min_tokens <= args.max_tokens:
        parser.error("need 1 <= --min-tokens <= --max-tokens")
    if args.request_rate <= 0 or (args.concurrency is not None and args.concurrency < 1):
        parser.error("--request-rate and --concurrency must be positive")
    return args


def main() -> int:
    args = parse_args()
    images = ImageSource(args.image_dir, args.image_format, args.seed)
    workload = build_workload(
        args.num_requests, args.repeat_ratio, args.min_tokens, args.max_tokens, images, args.seed
    )
    report: dict[str, object] = {
        "run": run_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    server = None
    if args.start_server:
        log = args.server_log or Path(tempfile.gettempdir()) / f"mm-runtime-serve-{os.getpid()}.log"
        server = ServerProcess(args.address, shlex.split(args.server_args), log)
        print(f"starting: {shlex.join(server.cmd)} (log: {log})")
        report["server_start_s"] = server.start()
        print(f"server healthy after {report['server_start_s']:.1f} s")
    try:
        run = asyncio.run(
            run_load(
                args.address,
                workload,
                args.request_rate,
                args.concurrency,
                args.seed,
                args.warmup_requests,
                not args.no_progress,
            )
        )
    finally:
        if server is not None:
            report["server_exit_code"] = server.stop()
    summary = summarize(workload, run)
    report["summary"] = summary
    report["requests"] = [asdict(r) for r in run["results"]]  # type: ignore[attr-defined]
    print_summary(summary)
    exit_code = 0 if summary["num_failed"] == 0 else 1
    if server is not None:
        print(f"server stopped with SIGINT: exit code {report['server_exit_code']}")
        if report["server_exit_code"] != 0:
            print(f"the server did not stop cleanly; its log ends:\n{server.tail()}")
            exit_code = 1
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
