"""Preprocess throughput: encoded image bytes -> encoder tensors, as a preprocess worker does it
(`decode_image` + `ImageProcessor`, preprocess_worker/processors.py), per worker and for N
workers side by side.

For each model, image size (square) and format (PNG, JPEG q90): first one in-process worker
timed step by step (decode ms, HF processor ms), then N spawn processes (N = 1, 2, 4, ... up to
`os.cpu_count()`), each with torch threads = 1 like `run_preprocess_worker`, all starting
together on the same bytes; images/s counts every worker's images over the wall time from the
common start to the last finish. The images are photo-like (a smooth upscaled random image plus
noise), so PNG and JPEG sizes resemble photos rather than incompressible noise.

The default models are the tiny Qwen2-VL and LLaVA demo models: their processors resize like the
real ones but to small targets (Qwen2-VL: at most 64 merged tokens; LLaVA: 42x42), so decode
dominates; pass --model DIR for a real model's processor. Qwen2-VL's resize runs on the GPU
worker for images up to the processor's max_pixels (shared/image_resize.py), so with a real
Qwen2-VL model this times decoding and the copy of the pixels only.

    python bench/preprocess.py
    python bench/preprocess.py --model /models/Qwen2-VL-2B-Instruct --sizes 1024 --json out.json
"""

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import statistics
import time
from multiprocessing.synchronize import Barrier

import numpy as np
import torch
from PIL import Image

from mm_runtime.preprocess_worker.processors import ImageProcessor, decode_image
from mm_runtime.shared.model_info import ModelInfo
from mm_runtime.shared.tiny_models import tiny_model_dir

FORMATS = ("PNG", "JPEG")


def photo_like(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(size // 16, 2), max(size // 16, 2), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
    noisy = smooth.astype(np.int16) + rng.normal(0, 6, smooth.shape).astype(np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))  # [size, size, 3]


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def worker_counts(cpu_count: int) -> list[int]:
    counts = [1 << i for i in range(cpu_count.bit_length()) if 1 << i <= cpu_count]
    return counts if counts[-1] == cpu_count else [*counts, cpu_count]


def time_in_process(processor: ImageProcessor, data: bytes, seconds: float) -> tuple[float, float]:
    """Median (decode s, processor s) of one image, repeated for about `seconds`."""
    processor(decode_image(data))  # warm-up
    decode_s, process_s = [], []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(decode_s) < 3:
        start = time.perf_counter()
        image = decode_image(data)
        mid = time.perf_counter()
        processor(image)
        decode_s.append(mid - start)
        process_s.append(time.perf_counter() - mid)
    return statistics.median(decode_s), statistics.median(process_s)


def worker_loop(tasks: mp.Queue, results: mp.Queue, barrier: Barrier) -> None:
    """Child: per task (model dir, bytes, count), wait for all workers, then process `count`
    images and report (start, end) on the shared monotonic clock."""
    torch.set_num_threads(1)  # as run_preprocess_worker does
    processors: dict[str, ImageProcessor] = {}
    while (task := tasks.get()) is not None:
        model_dir, data, count = task
        if model_dir not in processors:
            processors[model_dir] = ImageProcessor(ModelInfo.from_model_dir(model_dir))
        processor = processors[model_dir]
        processor.process_bytes(data)  # warm-up
        barrier.wait()
        start = time.perf_counter()
        for _ in range(count):
            processor.process_bytes(data)
        results.put((start, time.perf_counter()))


class WorkerGroup:
    """N spawn processes that process the same task together."""

    def __init__(self, num_workers: int) -> None:
        ctx = mp.get_context("spawn")
        self.barrier = ctx.Barrier(num_workers)
        self.results: mp.Queue = ctx.Queue()
        self.queues: list[mp.Queue] = [ctx.Queue() for _ in range(num_workers)]
        self.procs = [
            ctx.Process(target=worker_loop, args=(q, self.results, self.barrier), daemon=True)
            for q in self.queues
        ]
        for p in self.procs:
            p.start()

    def images_per_s(self, model_dir: str, data: bytes, count: int) -> float:
        for q in self.queues:
            q.put((model_dir, data, count))
        spans = [self.results.get(timeout=600) for _ in self.queues]
        wall_s = max(end for _, end in spans) - min(start for start, _ in spans)
        return len(spans) * count / wall_s

    def close(self) -> None:
        for q in self.queues:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", help="model dirs (default: the tiny demo models)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--workers", type=int, nargs="+", help="default: 1, 2, 4, .. cpu_count")
    parser.add_argument("--seconds", type=float, default=1.5, help="per measurement")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = args.model or [str(tiny_model_dir(arch)) for arch in ("qwen2_vl", "llava")]
    counts = args.workers or worker_counts(os.cpu_count() or 1)
    cases = [
        (model_dir, size, fmt, encode(photo_like(size), fmt))
        for model_dir in models
        for size in args.sizes
        for fmt in FORMATS
    ]

    rows = []
    processors = {m: ImageProcessor(ModelInfo.from_model_dir(m)) for m in models}
    for model_dir, size, fmt, data in cases:
        decode_s, process_s = time_in_process(processors[model_dir], data, args.seconds)
        rows.append(
            {
                "model": processors[model_dir].info.model_type,
                "model_dir": model_dir,
                "size": size,
                "format": fmt,
                "kib": len(data) / 1024,
                "decode_ms": decode_s * 1e3,
                "processor_ms": process_s * 1e3,
                "images_per_s": {},
            }
        )
    for num_workers in counts:
        group = WorkerGroup(num_workers)
        try:
            for row, (model_dir, _, _, data) in zip(rows, cases, strict=True):
                per_image_s = (row["decode_ms"] + row["processor_ms"]) / 1e3
                count = max(3, math.ceil(args.seconds / per_image_s))
                row["images_per_s"][num_workers] = group.images_per_s(model_dir, data, count)
        finally:
            group.close()

    print(
        f"Preprocess (decode_image + ImageProcessor), torch threads = 1 per worker, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    header = f"{'model':<9}{'size':>6}{'fmt':>5}{'KiB':>7}{'decode':>9}{'proc':>8}"
    header += "".join(f"{f'N={n} img/s':>12}{'/worker':>8}" for n in counts)
    print(header)
    for r in rows:
        line = f"{r['model']:<9}{r['size']:>6}{r['format']:>5}{r['kib']:>7.0f}"
        line += f"{r['decode_ms']:>6.1f} ms{r['processor_ms']:>5.1f} ms"
        for n in counts:
            rate = r["images_per_s"][n]
            line += f"{rate:>12.1f}{rate / n:>8.1f}"
        print(line)
    if args.json:
        meta = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "workers": counts}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
