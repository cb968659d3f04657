"""What the offline `LLM`'s image pool spends on one PIL image, and how threads scale with it.

The pool's threads load each image, hash it (`frontend/media.py`) and run the processor
(`preprocess_worker/processors.py`); every copy of the pixels made in Python holds the GIL and
serializes them. Times one random image through the product's path (`llm._load_image`, then
`ImageProcessor`: the RGB image as given, one copy of PIL's bytes shared by the BLAKE3 hash and
the processor, Qwen2-VL's resize left to the GPU worker) against the path of 2026-11-30 (an RGB
copy, SHA-256 over the pixels, the processor's resize on the CPU over a second copy of PIL's
bytes), on one thread and on pools of 8 and 16 threads (16 with torch at one intra-op thread).

    python bench/image_copies.py --model DIR [--size 1920x1080]
"""

import argparse
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF
from transformers.image_utils import pil_torch_interpolation_mapping
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from mm_runtime.llm import _load_image
from mm_runtime.preprocess_worker.processors import ImageProcessor
from mm_runtime.shared.model_info import ModelInfo


def per_image_ms(fn: Callable[[], object], threads: int, n: int) -> float:
    """Wall milliseconds per call of `fn` run n times by a pool of `threads` (one warm-up each)."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: fn(), range(threads)))
        start = time.perf_counter()
        list(pool.map(lambda _: fn(), range(n)))
        return 1e3 * (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Qwen2-VL model dir (its processor)")
    parser.add_argument("--size", default="1920x1080")
    parser.add_argument("--n", type=int, default=160)
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    processor = ImageProcessor(ModelInfo.from_model_dir(args.model))
    assert processor.info.model_type == "qwen2_vl", "the copies measured are Qwen2-VL's path"
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)

    def product() -> object:  # the offline LLM's path for a PIL image (llm.py)
        loaded, pixels, digest = _load_image(image)
        return digest, processor(loaded, pixels)

    hf = processor.hf_processor
    height_out, width_out = smart_resize(
        height,
        width,
        factor=hf.patch_size * hf.merge_size,
        min_pixels=hf.size["shortest_edge"],
        max_pixels=hf.size["longest_edge"],
    )
    mode = pil_torch_interpolation_mapping[hf.resample]

    def before() -> object:  # the path of 2026-11-30 (2e26fea)
        rgb = image.convert("RGB")
        digest = hashlib.sha256(f"{rgb.mode}:{rgb.size}".encode())
        digest.update(np.asarray(rgb))
        chw = torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1)
        resized = tvF.resize(chw, [height_out, width_out], interpolation=mode, antialias=True)
        return digest.hexdigest(), resized.unsqueeze(0).contiguous()

    print(f"{args.size}, {torch.get_num_threads()} torch threads")
    print("| path | 1 thread | 8 threads | 16 threads, torch at 1 |")
    print("| --- | --- | --- | --- |")
    rows = {}
    for name, fn in (("2026-11-30", before), ("the product's", product)):
        rows[name] = [per_image_ms(fn, 1, 10), per_image_ms(fn, 8, args.n)]
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, fn in (("2026-11-30", before), ("the product's", product)):
        rows[name].append(per_image_ms(fn, 16, args.n))
    torch.set_num_threads(torch_threads)
    for name, times in rows.items():
        print(f"| {name} | " + " | ".join(f"{t:.2f} ms" for t in times) + " |")


if __name__ == "__main__":
    main()
