"""Qwen2-VL vision encoder: our ViT (gpu_worker/models/qwen2_vl_vision.py) against transformers'
on the same weights, per VisionArena image size and for a mixed batch, on one GPU.

Both models get the same random weights in bfloat16 and the same patches; each row times one
forward (CUDA events, median of --iters after warm-up) and reports ms, the achieved TFLOP/s
(GEMMs 2 * params * patches, attention 4 * patches^2 * width per block) and the speed-up.

    mm-runtime make-model-dir --config bench/configs/qwen2_vl_2b.json /tmp/qwen2-vl-2b
    python bench/vision_encoder.py --model /tmp/qwen2-vl-2b
"""

import argparse
import statistics

import torch
from transformers import AutoImageProcessor
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from workload import IMAGE_SIZES, markdown_table  # bench/ is the script dir on sys.path

from mm_runtime.gpu_worker.models.qwen2_vl_vision import Qwen2VisionTransformer
from mm_runtime.shared.image_resize import Qwen2VLResize
from mm_runtime.shared.model_info import ModelInfo


def patch_grid(width: int, height: int, resize: Qwen2VLResize) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the Qwen2-VL processor makes of an image (smart_resize)."""
    h, w = resize.target_size(height, width)
    return (1, h // resize.patch_size, w // resize.patch_size)


def flops(grids: list[tuple[int, int, int]], config: object, params: int) -> float:
    patches = sum(t * h * w for t, h, w in grids)
    attention = sum(t * 4 * (h * w) ** 2 * config.embed_dim for t, h, w in grids) * config.depth
    return 2 * params * patches + attention


def time_ms(fn: object, iters: int) -> float:
    times = []
    for i in range(iters + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 2:  # warm-up: kernel compiles, cuBLAS heuristics
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Qwen2-VL model directory")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    config = ModelInfo.from_model_dir(args.model).hf_config.vision_config
    config._attn_implementation = "sdpa"  # as from_pretrained picks on a GPU without flash-attn
    config.dtype = torch.bfloat16
    resize = Qwen2VLResize.from_processor(AutoImageProcessor.from_pretrained(args.model))
    torch.manual_seed(0)
    with torch.device("cuda"):
        theirs = Qwen2VisionTransformerPretrainedModel._from_config(config).eval()
        ours = Qwen2VisionTransformer(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for param in theirs.parameters():
            param.uniform_(-0.02, 0.02)
    ours.load_state_dict(theirs.state_dict())
    num_params = sum(p.numel() for p in ours.parameters())
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2

    cases = [(f"{w}x{h}", [patch_grid(w, h, resize)]) for w, h in IMAGE_SIZES]
    mixed = [patch_grid(w, h, resize) for w, h in IMAGE_SIZES]
    cases.append(("all 7 sizes in one batch", mixed))
    rows = []
    for name, grids in cases:
        patches = sum(t * h * w for t, h, w in grids)
        pixels = torch.randn(patches, patch_dim, device="cuda")
        grid_tensor = torch.tensor(grids, device="cuda")
        with torch.inference_mode():
            hf_ms = time_ms(lambda: theirs(pixels, grid_thw=grid_tensor), args.iters)  # noqa: B023
            our_ms = time_ms(lambda: ours(pixels, grids), args.iters)  # noqa: B023
        tflop = flops(grids, config, num_params) / 1e12
        rows.append(
            [
                name,
                str(patches),
                f"{hf_ms:.2f} ms ({tflop / hf_ms * 1e3:.0f} TFLOP/s)",
                f"{our_ms:.2f} ms ({tflop / our_ms * 1e3:.0f} TFLOP/s)",
                f"{hf_ms / our_ms:.2f}x",
            ]
        )
    print(f"device: {torch.cuda.get_device_name()}; ViT {num_params / 1e6:.0f}M params, bf16")
    print(markdown_table(["image", "patches", "transformers", "ours", "speed-up"], rows))


if __name__ == "__main__":
    main()
