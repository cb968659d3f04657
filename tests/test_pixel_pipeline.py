"""The image path split between processes: the preprocess worker's uint8 image, resized (Qwen2-VL),
rescaled, normalized and patchified (Qwen2-VL) by the GPU worker's model, equals the HF
processor's `pixel_values` bit for bit on the CPU, and so does the patch grid. On CUDA the
float steps are still bit-equal; Qwen2-VL's resize, run there as float32 passes in place of the
CPU's fixed-point ones (shared/image_resize.py), may move about 1 % of a noise image's values by
up to 2 levels."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from mm_testing import ARCHS, random_image
from transformers import AutoImageProcessor

from mm_runtime.gpu_worker.layers.attention import TorchAttentionBackend
from mm_runtime.gpu_worker.models.loader import build_model
from mm_runtime.preprocess_worker.processors import ImageProcessor
from mm_runtime.shared.model_info import ModelInfo
from mm_runtime.shared.wire import MMItem, PlaceholderRange

# Up- and downscaled, square, extreme aspect ratios, odd sizes, a size the resize keeps.
SIZES = [(23, 17), (5, 300), (64, 48), (336, 336), (1000, 37), (641, 479), (1920, 1080)]
HUB_SIZES = {  # the hub processors' sizes, in place of the tiny models' small ones
    "qwen2_vl": {"size": {"longest_edge": 12845056, "shortest_edge": 3136}},
    "llava": {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
}


def _with_hub_sizes(model_dir: Path, arch: str, tmp_path: Path) -> Path:
    out = tmp_path / arch
    shutil.copytree(model_dir, out)
    path = out / "processor_config.json"
    config = json.loads(path.read_text())
    config["image_processor"].update(HUB_SIZES[arch])
    path.write_text(json.dumps(config))
    return out


def _check(model_dir: Path, arch: str, device: str) -> None:
    info = ModelInfo.from_model_dir(model_dir)
    processor = ImageProcessor(info)
    model = build_model(info, TorchAttentionBackend(), torch.float32, torch.device(device), "dummy")
    hf = AutoImageProcessor.from_pretrained(model_dir)
    one_level = hf.rescale_factor / min(hf.image_std)  # a uint8 step, normalized
    for seed, (width, height) in enumerate(SIZES):
        image = random_image(width, height, seed)
        ours = processor(image).tensors
        expected = hf(images=[image], return_tensors="pt")
        assert ours["pixel_values"].dtype == torch.uint8
        if arch == "qwen2_vl":
            assert torch.equal(ours["image_grid_thw"], expected["image_grid_thw"])
        item = MMItem(
            modality="image",
            mm_hash="h",
            placeholder=PlaceholderRange(0, info.num_image_tokens(ours)),
            tensors=ours,
        )
        if arch == "qwen2_vl":  # (the tiny LLaVA's CLIP takes 42-pixel images, not the hub's)
            assert model.item_length(item) == item.placeholder.length
        pixels = model.encoder_pixels([item], torch.float32).cpu()
        assert pixels.dtype == torch.float32
        if device == "cpu" or arch != "qwen2_vl":
            assert torch.equal(pixels, expected["pixel_values"]), (width, height)
        else:  # Qwen2-VL's resize on CUDA
            levels = (pixels - expected["pixel_values"]).abs() / one_level
            assert levels.max() <= 2 + 1e-4, (width, height, levels.max().item())
            assert (levels > 0.5).float().mean() < 0.02, (width, height)


@pytest.mark.parametrize("hub_sizes", [False, True], ids=["tiny", "hub"])
@pytest.mark.parametrize("arch", ARCHS)
def test_equals_the_hf_processor_on_cpu(
    tiny_models: dict[str, Path], arch: str, hub_sizes: bool, tmp_path: Path
) -> None:
    model_dir = _with_hub_sizes(tiny_models[arch], arch, tmp_path) if hub_sizes else None
    _check(model_dir or tiny_models[arch], arch, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_equals_the_hf_processor_on_gpu(
    tiny_models: dict[str, Path], arch: str, tmp_path: Path
) -> None:
    _check(_with_hub_sizes(tiny_models[arch], arch, tmp_path), arch, "cuda")
