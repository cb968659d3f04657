"""The ViT's attention alone: torch's flash attention per image (what the Qwen2-VL ViT called
before) against cuDNN's fused attention over all images in one call
(gpu_worker/layers/cudnn_varlen_attention.py), on Qwen2-VL-2B's shapes (16 heads of 80).

Each row: q, k, v as strided views of one fused QKV output, as the ViT has them; CUDA events,
median of --iters after warm-up; TFLOP/s = 4 * patches^2 * heads * head_dim per image. Both are
checked against float32 attention on the same inputs (relative error); the first call of a new
bucket (the cuDNN graph build) is timed on its own.

    python bench/vit_attention.py
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
from vision_encoder import time_ms  # bench/ is the script dir on sys.path
from workload import IMAGE_SIZES, markdown_table

from mm_runtime.gpu_worker.layers import cudnn_varlen_attention as cva


def patches_of(width: int, height: int) -> int:
    """Patches the Qwen2-VL processor makes of an image at the hub's pixel limits."""
    factor = 28  # patch 14, merged 2 x 2
    h, w = smart_resize(height, width, factor, min_pixels=56 * 56, max_pixels=12845056)
    return (h // 14) * (w // 14)


def flash_per_image(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]
) -> torch.Tensor:
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        outs = [
            F.scaled_dot_product_attention(*(t.transpose(0, 1).unsqueeze(0) for t in qkv))[0]
            for qkv in zip(*(t.split(lengths) for t in (q, k, v)), strict=True)
        ]
    return torch.cat([o.transpose(0, 1) for o in outs])


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]
) -> torch.Tensor:
    outs = []
    for qi, ki, vi in zip(*(t.float().split(lengths) for t in (q, k, v)), strict=True):
        qi, ki, vi = (t.transpose(0, 1) for t in (qi, ki, vi))  # [heads, n, d]
        with sdpa_kernel([SDPBackend.MATH]):
            outs.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))
    return torch.cat(outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=80)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if not cva.supports(torch.bfloat16, args.head_dim):
        raise SystemExit("the cudnn frontend (nvidia-cudnn-frontend) does not import here")
    import cudnn

    print(f"cudnn frontend {cudnn.__version__}, backend {cudnn.backend_version()}")
    torch.manual_seed(0)
    h, d = args.heads, args.head_dim
    sizes = [patches_of(w, hh) for w, hh in IMAGE_SIZES]
    cases = [(f"{w}x{hh}", [n]) for (w, hh), n in zip(IMAGE_SIZES, sizes, strict=True)]
    cases.append(("all 7 sizes in one batch", sizes))
    cases.append(("16 x 336x336", [sizes[0]] * 16))
    cases.append(("3 sizes (3 padded to 4)", sizes[2:5]))
    rows = []
    for name, lengths in cases:
        n = sum(lengths)
        qkv = torch.randn(n, 3, h, d, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.unbind(1)
        ref = reference(q, k, v, lengths)
        t0 = time.perf_counter()
        first = cva.varlen_attention(q, k, v, lengths)
        torch.cuda.synchronize()
        build_ms = (time.perf_counter() - t0) * 1e3
        errors = []
        for out in (flash_per_image(q, k, v, lengths), first):
            errors.append(float((out.float() - ref).norm() / ref.norm()))
        assert all(e < 1e-2 for e in errors), errors
        flash_ms = time_ms(lambda: flash_per_image(q, k, v, lengths), args.iters)  # noqa: B023
        cudnn_ms = time_ms(lambda: cva.varlen_attention(q, k, v, lengths), args.iters)  # noqa: B023
        tflop = sum(4 * m * m * h * d for m in lengths) / 1e12
        rows.append(
            [
                name,
                str(n),
                f"{flash_ms:.3f} ms ({tflop / flash_ms * 1e3:.0f} TFLOP/s)",
                f"{cudnn_ms:.3f} ms ({tflop / cudnn_ms * 1e3:.0f} TFLOP/s)",
                f"{flash_ms / cudnn_ms:.2f}x",
                f"{build_ms:.0f} ms",
                f"{errors[0]:.1e} / {errors[1]:.1e}",
            ]
        )
    header = ["images", "patches", "flash per image", "cuDNN varlen", "speed-up", "first call"]
    print(f"device: {torch.cuda.get_device_name()}; {h} heads x {d}, bf16; graphs built:")
    print(markdown_table([*header, "rel. error flash / cuDNN"], rows))


if __name__ == "__main__":
    main()
