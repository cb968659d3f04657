"""Offline throughput: N VisionArena-like requests through `mm_runtime.LLM`, beside Hugging Face
`generate` on the same requests in the same run.

Each request: one image of a random size (336x336 .. 1920x1080), a short question, 64-256 output
tokens with ignore_eos. Prints requests/s, output tokens/s and mean engine step time for ours
(with --repeats, of the median of that many runs, each on a fresh LLM: one workload's throughput
has varied by 11 % from run to run on one GPU), the same for HF (`generate` over padded batches
of --hf-batch-size; a batch runs to its longest request, only the requested tokens count), and
the ratio. On a GPU, also the workload's hardware
floor (bench/floor.py: FLOPs of prefill at the measured matmul rate, bytes of decode at the
measured copy bandwidth) and each engine's time over it. On CPU with the tiny demo model the
numbers are a sanity check only.

    python bench/offline.py                       # tiny Qwen2-VL demo model on CPU
    python bench/offline.py --model DIR --num-requests 200 --hf-batch-size 64
"""

import argparse
import copy
import gc
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from attention_kernels import copy_bandwidth  # bench/ is the script dir on sys.path
from floor import matmul_tflops, workload_floor
from PIL import Image
from profiling import print_profile, profiled
from transformers import AutoModelForImageTextToText, AutoProcessor
from workload import IMAGE_SIZES, QUESTIONS

from mm_runtime import LLM, SamplingParams
from mm_runtime.shared.model_info import IMAGE_PLACEHOLDERS, ModelInfo
from mm_runtime.shared.tiny_models import tiny_model_dir


def make_workload(n: int, min_tokens: int, max_tokens: int, seed: int) -> list[tuple]:
    """(question, image, output length) per request, the same for both engines."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    workload = []
    for _ in range(n):
        w, h = rng.choice(IMAGE_SIZES)
        pixels = np_rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        workload.append(
            (rng.choice(QUESTIONS), Image.fromarray(pixels), rng.randint(min_tokens, max_tokens))
        )
    return workload


def chat_prompt(processor: AutoProcessor, question: str) -> str:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def run_ours(args: argparse.Namespace, workload: list[tuple], prompts: list[str]) -> dict:
    llm = LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
    )
    engine = llm.engine
    start = time.perf_counter()
    mm_prompts = [
        {"prompt": prompt, "multi_modal_data": {"image": image}}
        for (_, image, _), prompt in zip(workload, prompts, strict=True)
    ]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, _, n in workload]
    with profiled(args.profile) as prof:
        requests = llm.build_requests(mm_prompts, params, add_special_tokens=False)
        for request in requests:
            engine.add_request(request)
        preprocess_s = time.perf_counter() - start  # the processor, on the CPU (a thread pool)
        num_tokens, num_steps = 0, 0
        # Not synchronized per step: each call queues a step before applying the last one.
        while engine.has_unfinished_requests():
            outputs = engine.step()
            num_steps += 1
            num_tokens += sum(len(o.new_token_ids) for o in outputs)
    elapsed = time.perf_counter() - start
    if prof is not None:
        print_profile(prof, elapsed)
    floor = None
    if engine.runner.device.type == "cuda":
        floor = workload_floor(engine, requests, copy_bandwidth(), matmul_tflops())
    return {
        "floor": floor,
        "seconds": elapsed,
        "requests_per_s": len(workload) / elapsed,
        "output_tokens_per_s": num_tokens / elapsed,
        "mean_step_ms": 1000 * (elapsed - preprocess_s) / max(num_steps, 1),
        "preprocess_s": preprocess_s,
        "num_steps": num_steps,
        "device": str(engine.runner.device),
        "dtype": str(engine.runner.dtype),
    }


def run_hf(args: argparse.Namespace, workload: list[tuple], prompts: list[str]) -> dict:
    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"  # decoder-only batching pads on the left
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.load_format == "dummy":  # random init straight on the device (7B on CPU is slow)
        config = ModelInfo.from_model_dir(args.model).hf_config
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    else:
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype)
    model = model.to(device).eval()
    gen_config = copy.deepcopy(model.generation_config)
    gen_config.eos_token_id = None  # like ignore_eos
    gen_config.do_sample = False
    num_tokens = 0
    start = time.perf_counter()
    for i in range(0, len(workload), args.hf_batch_size):
        batch = workload[i : i + args.hf_batch_size]
        inputs = processor(
            text=prompts[i : i + len(batch)],
            images=[im for _, im, _ in batch],
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
        ).to(device)
        gen_config.max_new_tokens = max(n for _, _, n in batch)
        with torch.inference_mode():
            model.generate(**inputs, generation_config=gen_config)
        num_tokens += sum(n for _, _, n in batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "requests_per_s": len(workload) / elapsed,
        "output_tokens_per_s": num_tokens / elapsed,
        "batch_size": args.hf_batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model dir (default: tiny Qwen2-VL demo)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--hf-batch-size", type=int, default=8)
    # None: the LLM's own defaults (vLLM V1's LLM-class ones: llm.py _batch_defaults)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler summary of our run (slower)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of ours (HF runs once); the median counts"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    args.model = args.model or str(tiny_model_dir("qwen2_vl"))
    model_type = ModelInfo.from_model_dir(args.model).model_type
    assert model_type in IMAGE_PLACEHOLDERS
    workload = make_workload(args.num_requests, args.min_tokens, args.max_tokens, args.seed)
    processor = AutoProcessor.from_pretrained(args.model)
    prompts = [chat_prompt(processor, q) for q, _, _ in workload]

    runs = []
    for _ in range(args.repeats):  # a fresh LLM each time: no cache carries over
        runs.append(run_ours(args, workload, prompts))
        print(f"ours: {json.dumps(runs[-1])}", flush=True)  # before HF, which may run out of time
        gc.collect()  # our engine (KV cache, graphs) is gone: give its memory to the next
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    # The median run by throughput (the upper one of an even count) stands for ours.
    results = {
        "model": args.model,
        "num_requests": args.num_requests,
        "ours": sorted(runs, key=lambda r: r["requests_per_s"])[len(runs) // 2],
        "ours_runs_requests_per_s": [r["requests_per_s"] for r in runs],
    }
    if not args.skip_hf:
        results["hf"] = run_hf(args, workload, prompts)
        results["speedup"] = results["ours"]["requests_per_s"] / results["hf"]["requests_per_s"]
    ours = results["ours"]
    print(f"model {args.model} ({model_type}), {args.num_requests} requests")
    print(f"  on {ours['device']} ({ours['dtype']})")
    print(
        f"  mm-runtime : {ours['requests_per_s']:8.2f} req/s"
        f"  {ours['output_tokens_per_s']:10.1f} out tok/s"
        f"  mean step {ours['mean_step_ms']:.2f} ms over {ours['num_steps']} steps"
        f" (preprocessing {ours['preprocess_s']:.1f} s of {ours['seconds']:.1f} s)"
    )
    if len(runs) > 1:
        each = ", ".join(f"{r:.2f}" for r in results["ours_runs_requests_per_s"])
        print(f"               the median of {len(runs)} runs, in order: {each} req/s")
    if "hf" in results:
        hf = results["hf"]
        print(
            f"  HF generate: {hf['requests_per_s']:8.2f} req/s"
            f"  {hf['output_tokens_per_s']:10.1f} out tok/s  (batches of {hf['batch_size']})"
        )
        print(f"  speedup    : {results['speedup']:.2f}x")
    floor = ours["floor"]
    if floor is not None:
        print(
            f"  hardware floor: {floor['seconds']:.1f} s = prefill {floor['prefill_tflop']:.0f}"
            f" TFLOP at {floor['matmul_tflops']:.0f} TFLOP/s ({floor['prefill_s']:.1f} s) + decode"
            f" {floor['decode_gb']:.0f} GB at {floor['copy_gbs']:.0f} GB/s"
            f" ({floor['decode_s']:.1f} s, batches of {floor['decode_batch']})"
        )
        others = [("mm-runtime", ours)] + (
            [("HF generate", results["hf"])] if "hf" in results else []
        )
        for name, r in others:
            print(f"  {name} / floor: {r['seconds'] / floor['seconds']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
