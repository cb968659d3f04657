"""Qwen2-VL's resize split between the processes: which shipped sizes the GPU worker accepts for a
patch grid, and that the resize is the processor's own (the pixels themselves are pinned against
the HF processor in tests/test_pixel_pipeline.py)."""

import torch
from torchvision.transforms import InterpolationMode

from mm_runtime.shared.image_resize import Qwen2VLResize

# The tiny Qwen2-VL processor's settings: 28-pixel merged patches, 56 x 56 to 224 x 224 pixels.
RESIZE = Qwen2VLResize(
    patch_size=14,
    factor=28,
    min_pixels=56 * 56,
    max_pixels=224 * 224,
    do_resize=True,
    interpolation=InterpolationMode.BICUBIC,
)


def test_target_size_is_smart_resize() -> None:
    assert RESIZE.target_size(100, 150) == (112, 140)  # rounded to multiples of 28
    assert RESIZE.target_size(40, 40) == (56, 56)  # scaled up to min_pixels
    assert RESIZE.target_size(300, 250) == (224, 196)  # scaled down to max_pixels


def test_ships_as() -> None:
    # an image within max_pixels travels as decoded, for the GPU worker to resize
    assert RESIZE.ships_as(100, 150, (112, 140))
    assert not RESIZE.ships_as(100, 150, (140, 140))  # another size's grid
    # over max_pixels the preprocess worker resizes: only the resized size is accepted
    assert RESIZE.ships_as(224, 196, (224, 196))
    assert not RESIZE.ships_as(300, 250, (224, 196))
    # a size the processor refuses (aspect ratio over 200) resizes to nothing
    assert not RESIZE.ships_as(1, 300, (28, 56))


def test_resize_keeps_an_image_of_the_target_size() -> None:
    image = torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8)
    assert RESIZE.resize(image, (56, 84)) is image
    resized = RESIZE.resize(image, (84, 112))
    assert resized.shape == (3, 84, 112) and resized.dtype == torch.uint8


def test_uint8_passes_in_float_stay_within_two_levels_of_the_cpu_kernel() -> None:
    """The path off the CPU, run here on the CPU's float kernel: width pass, uint8 rounding,
    height pass, as torch's uint8 kernel does them. A noise image is the worst case: one float
    pass (torchvision's path on CUDA) lands 20-odd levels away where bicubic overshoots."""
    from torchvision.transforms.v2 import functional as tvF

    from mm_runtime.shared.image_resize import _resize_as_uint8_passes

    gen = torch.Generator().manual_seed(0)
    for height, width, size in [(17, 23, (56, 84)), (479, 641, (476, 644)), (37, 1000, (28, 1008))]:
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)
        expected = tvF.resize(image, list(size), InterpolationMode.BICUBIC, antialias=True)
        hwc = image.permute(1, 2, 0).contiguous()  # as shipped: Pillow's layout
        ours = _resize_as_uint8_passes(hwc.permute(2, 0, 1), size, "bicubic")
        diff = (ours.int() - expected.int()).abs()
        assert ours.shape == expected.shape and ours.dtype == torch.uint8
        assert diff.max() <= 2 and (diff > 0).float().mean() < 0.02, (height, width)
        one_pass = tvF.resize(image.float(), list(size), InterpolationMode.BICUBIC, antialias=True)
        assert (one_pass.clamp(0, 255).round() - expected).abs().max() > 10  # what this mends
