"""Decoding and processing in the preprocess worker: every format and mode decodes to the same RGB
image, every bad input is a `MediaError` naming the problem, and processing bytes equals
processing the decoded image.
"""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from mm_testing import ARCHS, handmade_png, random_image
from PIL import Image

from mm_runtime.preprocess_worker.processors import ImageProcessor, convert_image, decode_image
from mm_runtime.shared.errors import MediaError
from mm_runtime.shared.model_info import ModelInfo


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


IMAGE = random_image(23, 17, seed=1)
PNG = encode(IMAGE)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# ---- decode_image: encoded bytes ----


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_every_format_decodes_to_rgb(fmt: str) -> None:
    image = decode_image(encode(IMAGE, fmt))
    assert image.mode == "RGB" and image.size == IMAGE.size
    if fmt in ("PNG", "BMP"):  # lossless
        assert (pixels(image) == pixels(IMAGE)).all()


def test_decoding_is_deterministic() -> None:
    data = encode(IMAGE, "JPEG")
    assert (pixels(decode_image(data)) == pixels(decode_image(bytes(data)))).all()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "1"])
def test_any_encoded_mode_becomes_rgb(mode: str) -> None:
    assert decode_image(encode(IMAGE.convert(mode))).mode == "RGB"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (PNG[: len(PNG) // 2], "truncated"),
        (PNG[:30], "cannot decode image"),
        (b"", r"cannot decode image \(0 bytes\)"),
        (b"hello world", r"cannot decode image \(11 bytes\)"),
        (b"not an image", "cannot decode image"),
        (handmade_png(0, 0), "cannot decode image"),
        (handmade_png(100_000, 100_000), "decompression bomb"),
    ],
    ids=["truncated", "header_only", "empty", "text", "text2", "zero_size_png", "bomb"],
)
def test_bad_bytes(data: bytes, match: str) -> None:
    with pytest.raises(MediaError, match=match) as info:
        decode_image(data)
    assert info.value.code == "invalid_media"


# ---- convert_image: a PIL image given in-process ----


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "F", "1"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    assert convert_image(IMAGE.convert(mode)).mode == "RGB"


def test_pil_image_is_taken_as_is() -> None:
    assert convert_image(IMAGE) is IMAGE  # RGB already: no copy


def test_lazily_opened_pil_image_is_decoded() -> None:
    image = convert_image(Image.open(io.BytesIO(PNG)))
    assert (pixels(image) == pixels(IMAGE)).all()


def test_lazily_opened_truncated_pil_image_fails() -> None:
    with pytest.raises(MediaError, match="truncated") as info:
        convert_image(Image.open(io.BytesIO(PNG[: len(PNG) // 2])))
    assert info.value.code == "invalid_media"


@pytest.mark.parametrize(("size", "match"), [((0, 0), r"\(0x0\)"), ((5, 0), r"\(5x0\)")])
def test_empty_pil_image(size: tuple[int, int], match: str) -> None:
    with pytest.raises(MediaError, match=r"no pixels " + match) as info:
        convert_image(Image.new("RGB", size))
    assert info.value.code == "invalid_media"


def test_pil_refuses_to_write_an_empty_png() -> None:
    """Why the 0x0 bytes case needs a hand-made file (handmade_png)."""
    with pytest.raises((ValueError, SystemError)):
        encode(Image.new("RGB", (0, 0)))


# ---- ImageProcessor on bytes ----


@pytest.mark.parametrize("arch", ARCHS)
def test_process_bytes_equals_processing_the_decoded_image(
    tiny_models: dict[str, Path], arch: str
) -> None:
    processor = ImageProcessor(ModelInfo.from_model_dir(tiny_models[arch]))
    for size in [(23, 17), (64, 48), (40, 90)]:
        data = encode(random_image(*size, seed=3), "JPEG")
        from_bytes = processor.process_bytes(data)
        from_image = processor(decode_image(data))
        assert from_bytes.num_tokens == from_image.num_tokens > 0
        assert from_bytes.tensors.keys() == from_image.tensors.keys()
        for key, tensor in from_bytes.tensors.items():
            assert torch.equal(tensor, from_image.tensors[key]), key
    with pytest.raises(MediaError, match="cannot decode image"):
        processor.process_bytes(b"hello world")


def test_qwen2_vl_ships_the_decoded_image_up_to_max_pixels(tiny_models: dict[str, Path]) -> None:
    """Qwen2-VL's resize runs on the GPU worker: an image within max_pixels (the tiny model's is
    224 x 224) travels as decoded, [1, height, width, 3], with the grid it resizes to; a larger
    one is resized here, to that grid's size."""
    processor = ImageProcessor(ModelInfo.from_model_dir(tiny_models["qwen2_vl"]))
    small = random_image(150, 100, seed=4)
    tensors = processor(small).tensors
    assert torch.equal(tensors["pixel_values"][0], torch.from_numpy(np.asarray(small)))
    assert tensors["image_grid_thw"].tolist() == [[1, 8, 10]]  # 112 x 140 in 14-pixel patches
    large = random_image(300, 250, seed=5)
    tensors = processor(large).tensors
    _, grid_h, grid_w = tensors["image_grid_thw"][0].tolist()
    assert tensors["pixel_values"].shape == (1, grid_h * 14, grid_w * 14, 3)
    assert grid_h * grid_w * 14 * 14 <= 224 * 224 < 300 * 250
