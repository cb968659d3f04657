"""Media loading: every source kind decodes to the same RGB image, the hash follows the bytes, and
local paths are served only from under the allowed folder.
"""

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from mm_testing import random_image
from PIL import Image

from mm_runtime.frontend.media import load_image
from mm_runtime.shared.errors import MediaError


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


IMAGE = random_image(23, 17, seed=1)
PNG = encode(IMAGE)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# ---- sources ----


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_bytes_and_data_url_decode_alike(fmt: str) -> None:
    data = encode(IMAGE, fmt)
    from_bytes = load_image(data)
    from_url = load_image(data_url(data, f"image/{fmt.lower()}"))
    assert from_bytes.image.mode == "RGB" and from_bytes.image.size == IMAGE.size
    assert (pixels(from_bytes.image) == pixels(from_url.image)).all()
    assert from_bytes.mm_hash == from_url.mm_hash
    if fmt in ("PNG", "BMP"):  # lossless
        assert (pixels(from_bytes.image) == pixels(IMAGE)).all()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "F", "1"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    image = IMAGE.convert(mode)
    assert load_image(image).image.mode == "RGB"
    if mode not in ("F", "CMYK"):  # not writable as PNG
        assert load_image(encode(image)).image.mode == "RGB"


def test_pil_image_is_taken_as_is() -> None:
    loaded = load_image(IMAGE)
    assert loaded.image.size == IMAGE.size
    assert (pixels(loaded.image) == pixels(IMAGE)).all()


def test_lazily_opened_pil_image_is_decoded() -> None:
    loaded = load_image(Image.open(io.BytesIO(PNG)))
    assert (pixels(loaded.image) == pixels(IMAGE)).all()


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png," + PNG[:10].hex(), "must look like data:image/<type>;base64"),
        ("data:image/png;base64", "must look like"),
        (data_url(b"hello world"), "cannot decode image"),
        (data_url(b""), "cannot decode image"),
    ],
)
def test_bad_data_urls(url: str, match: str) -> None:
    with pytest.raises(MediaError, match=match) as info:
        load_image(url)
    assert info.value.code == "invalid_media"


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (PNG[: len(PNG) // 2], "truncated"),
        (PNG[:30], "cannot decode image"),
        (b"", r"cannot decode image \(0 bytes\)"),
        (Image.new("RGB", (0, 0)), r"no pixels \(0x0\)"),
        (Image.new("RGB", (5, 0)), r"no pixels \(5x0\)"),
        ("http://example.com/a.png", "unsupported image source 'http://"),
        ("ftp://example.com/a.png", "unsupported image source"),
        (None, "unsupported image source of type NoneType"),
        (1.5, "unsupported image source of type float"),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, str) else x[:20],
)
def test_bad_sources(source: object, match: str) -> None:
    with pytest.raises(MediaError, match=match):
        load_image(source)  # type: ignore[arg-type]


def test_pil_refuses_to_write_an_empty_png() -> None:
    """Why the 0x0 bytes case needs a hand-made file (see test_engine_errors.handmade_png)."""
    with pytest.raises((ValueError, SystemError)):
        encode(Image.new("RGB", (0, 0)))


# ---- local paths ----


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "cat.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    return allowed


def test_local_path_under_allowed_folder(media_dir: Path) -> None:
    path = media_dir / "sub" / "cat.png"
    for source in (path, str(path), f"file://{path}"):
        loaded = load_image(source, allowed_local_media_path=media_dir)
        assert (pixels(loaded.image) == pixels(IMAGE)).all()
        assert loaded.mm_hash == load_image(PNG).mm_hash


def test_local_path_refused_without_allowed_folder(media_dir: Path) -> None:
    path = media_dir / "sub" / "cat.png"
    for source in (path, str(path), f"file://{path}"):
        with pytest.raises(MediaError, match="local image paths are not allowed"):
            load_image(source)


@pytest.mark.parametrize(
    "relative",
    ["../secret.png", "sub/../../secret.png", "link_out.png"],
)
def test_local_path_outside_allowed_folder(media_dir: Path, relative: str) -> None:
    """`..` and symlinks are resolved before the check, so neither escapes the folder."""
    (media_dir / "link_out.png").symlink_to(media_dir.parent / "secret.png")
    with pytest.raises(MediaError, match="outside the allowed local media path"):
        load_image(media_dir / relative, allowed_local_media_path=media_dir)
    with pytest.raises(MediaError, match="outside the allowed local media path"):
        load_image(f"file://{media_dir / relative}", allowed_local_media_path=media_dir)


def test_allowed_folder_prefix_is_not_enough(media_dir: Path) -> None:
    """/x/allowed_evil is not under /x/allowed even though the string starts with it."""
    sibling = media_dir.parent / (media_dir.name + "_evil")
    sibling.mkdir()
    (sibling / "cat.png").write_bytes(PNG)
    with pytest.raises(MediaError, match="outside"):
        load_image(sibling / "cat.png", allowed_local_media_path=media_dir)


def test_local_path_missing_or_not_an_image(media_dir: Path) -> None:
    with pytest.raises(MediaError, match="cannot read"):
        load_image(media_dir / "missing.png", allowed_local_media_path=media_dir)
    with pytest.raises(MediaError, match="cannot read"):
        load_image(media_dir / "sub", allowed_local_media_path=media_dir)  # a folder
    (media_dir / "notes.png").write_text("not an image")
    with pytest.raises(MediaError, match="cannot decode image"):
        load_image(media_dir / "notes.png", allowed_local_media_path=media_dir)


# ---- hashes ----


def test_same_bytes_same_hash_whatever_the_source(media_dir: Path) -> None:
    path = media_dir / "sub" / "cat.png"
    hashes = {
        load_image(PNG).mm_hash,
        load_image(bytes(PNG)).mm_hash,
        load_image(data_url(PNG)).mm_hash,
        load_image(path, allowed_local_media_path=media_dir).mm_hash,
    }
    assert len(hashes) == 1
    (mm_hash,) = hashes
    assert len(mm_hash) == 64 and int(mm_hash, 16) >= 0  # a full sha256 hex digest


def test_different_images_different_hashes() -> None:
    other = random_image(23, 17, seed=2)
    assert load_image(PNG).mm_hash != load_image(encode(other)).mm_hash
    assert load_image(IMAGE).mm_hash != load_image(other).mm_hash


def test_one_pixel_changes_the_hash() -> None:
    changed = IMAGE.copy()
    changed.putpixel((0, 0), tuple(255 - c for c in IMAGE.getpixel((0, 0))))
    assert load_image(IMAGE).mm_hash != load_image(changed).mm_hash
    assert load_image(PNG).mm_hash != load_image(encode(changed)).mm_hash


def test_pil_hash_follows_pixels() -> None:
    """Equal pixels hash equal (a copy, a lazily opened file); the same bytes laid out in another
    shape do not (the size is part of the hashed header)."""
    assert load_image(IMAGE).mm_hash == load_image(IMAGE.copy()).mm_hash
    assert load_image(IMAGE).mm_hash == load_image(Image.open(io.BytesIO(PNG))).mm_hash
    flat = np.asarray(IMAGE).reshape(-1, 3)  # 391 = 17 * 23 pixels
    wide = Image.fromarray(flat.reshape(17, 23, 3))
    tall = Image.fromarray(flat.reshape(23, 17, 3))
    assert wide.tobytes() == tall.tobytes()
    assert load_image(wide).mm_hash != load_image(tall).mm_hash


def test_same_pixels_other_encoding_hashes_by_bytes() -> None:
    """The hash is over the raw bytes, as DESIGN.md says: a PNG and a BMP of one image differ."""
    assert load_image(encode(IMAGE, "PNG")).mm_hash != load_image(encode(IMAGE, "BMP")).mm_hash
