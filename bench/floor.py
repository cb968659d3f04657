"""The hardware floor of an offline workload: a lower bound on the GPU time any engine needs.

Prefill (each image through its encoder, each prompt token through the language model) is
counted in FLOPs, at the dense bf16 matmul rate measured on this GPU; decode is counted in
bytes, at the measured copy bandwidth: every generated token reads the K/V of its whole context,
and every decode step reads the language model's weights once, with steps as large as the KV
cache (or max_num_seqs) allows. Prefill's bytes and decode's FLOPs are left out, so the floor is
below anything reachable (the brief's "FLOPs of prefill, bytes of decode").
"""

import math

import torch
from decode_step import weight_bytes  # bench/ is the script dir on sys.path
from torch import nn
from vision_encoder import flops as vit_flops

from mm_runtime.gpu_worker.engine import EngineCore
from mm_runtime.shared.wire import EngineRequest, MMItem


def matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    """Dense bf16 TFLOP/s of an n x n x n matmul on the current GPU."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1000) / 1e12


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def encoder_flops(engine: EngineCore, item: MMItem) -> float:
    """GEMM FLOPs (2 x params x tokens) plus full attention within the image."""
    model, config = engine.runner.model, engine.info.hf_config
    vision = config.vision_config
    assert item.tensors is not None
    if engine.info.model_type == "qwen2_vl":
        grid = tuple(int(x) for x in item.tensors["image_grid_thw"][0])  # (t, h, w) in patches
        return vit_flops([grid], vision, _params(model.visual))
    if engine.info.model_type == "llava":
        n = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + CLS
        tower = 2 * _params(model.vision_tower) * n
        attention = 4 * n * n * vision.hidden_size * vision.num_hidden_layers
        return tower + attention + 2 * _params(model.multi_modal_projector) * (n - 1)
    raise ValueError(f"no encoder FLOPs for {engine.info.model_type}")


def lm_prefill_flops(engine: EngineCore, num_tokens: int) -> float:
    """The decoder layers over a prompt: GEMMs plus causal attention (half of 4 n^2 d h)."""
    text = engine.info.hf_config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    gemms = 2 * _params(engine.runner.model.language_model.layers) * num_tokens
    attention = 2 * num_tokens**2 * head_dim * text.num_attention_heads * text.num_hidden_layers
    return gemms + attention


def workload_floor(
    engine: EngineCore, requests: list[EngineRequest], copy_gbs: float, tflops: float
) -> dict:
    """The floor of running `requests` (each to its max_tokens) on this engine's GPU."""
    prefill = sum(
        lm_prefill_flops(engine, len(r.prompt_token_ids))
        + sum(encoder_flops(engine, item) for item in r.mm_items)
        for r in requests
    )
    kv_per_token = engine.runner.kv_block_bytes() / engine.config.block_size
    kv_bytes, decode_tokens, total_len = 0.0, 0, 0
    for r in requests:
        prompt, out = len(r.prompt_token_ids), r.sampling_params.max_tokens
        # Output tokens 2..out are decoded; the j-th of them reads prompt + j tokens of K/V.
        kv_bytes += kv_per_token * ((out - 1) * prompt + (out - 1) * out / 2)
        decode_tokens += out - 1
        total_len += prompt + out
    capacity = (engine.num_kv_blocks - 1) * engine.config.block_size
    max_batch = min(engine.config.max_num_seqs, capacity * len(requests) // total_len)
    num_steps = math.ceil(decode_tokens / max(max_batch, 1))
    decode_bytes = kv_bytes + num_steps * weight_bytes(engine)
    prefill_s = prefill / (tflops * 1e12)
    decode_s = decode_bytes / (copy_gbs * 1e9)
    return {
        "seconds": prefill_s + decode_s,
        "prefill_tflop": prefill / 1e12,
        "prefill_s": prefill_s,
        "decode_gb": decode_bytes / 1e9,
        "decode_s": decode_s,
        "decode_batch": max_batch,
        "matmul_tflops": tflops,
        "copy_gbs": copy_gbs,
    }
