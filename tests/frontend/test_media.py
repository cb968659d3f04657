"""Media loading: every source kind gives the same raw bytes, undecoded, the hash follows the bytes
(or a PIL image's pixels), local paths are served only from under the allowed folder, and http(s)
URLs are fetched only from allowed hosts, redirects included, within a size cap.

Decoding is the preprocess worker's job: see tests/preprocess_worker/test_processors.py.
"""

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from mm_testing import random_image
from PIL import Image

from mm_runtime.frontend.media import UrlFetch, hash_pil_image, load_image_bytes
from mm_runtime.shared.errors import MediaError
from mm_runtime.shared.hashing import hash_media


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


IMAGE = random_image(23, 17, seed=1)
PNG = encode(IMAGE)


def mm_hash(source: object, **kw: object) -> str:
    return load_image_bytes(source, **kw)[1]  # type: ignore[arg-type]


# ---- sources ----


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_bytes_and_data_url_give_the_same_bytes(fmt: str) -> None:
    data = encode(IMAGE, fmt)
    from_bytes = load_image_bytes(data)
    from_url = load_image_bytes(data_url(data, f"image/{fmt.lower()}"))
    assert from_bytes == from_url == (data, hash_media(data))


@pytest.mark.parametrize(
    "data", [b"hello world", b"", PNG[: len(PNG) // 2]], ids=["text", "empty", "truncated"]
)
def test_bytes_are_not_decoded_here(data: bytes) -> None:
    """Bytes that are no image pass unchanged: the preprocess worker's decode fails them."""
    assert load_image_bytes(data) == (data, hash_media(data))
    assert load_image_bytes(data_url(data)) == (data, hash_media(data))


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png," + PNG[:10].hex(), "must look like data:image/<type>;base64"),
        ("data:image/png;base64", "must look like"),
    ],
)
def test_bad_data_urls(url: str, match: str) -> None:
    with pytest.raises(MediaError, match=match) as info:
        load_image_bytes(url)
    assert info.value.code == "invalid_media"


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("http://example.com/a.png", "unsupported image source 'http://"),
        ("ftp://example.com/a.png", "unsupported image source"),
        (None, "unsupported image source of type NoneType"),
        (1.5, "unsupported image source of type float"),
        (IMAGE, "unsupported image source of type Image"),  # hash_pil_image takes those
        (bytearray(PNG), "unsupported image source of type bytearray"),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, str) else x[:20],
)
def test_bad_sources(source: object, match: str) -> None:
    with pytest.raises(MediaError, match=match) as info:
        load_image_bytes(source)  # type: ignore[arg-type]
    assert info.value.code == "invalid_media"


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
        assert load_image_bytes(source, allowed_local_media_path=media_dir) == load_image_bytes(PNG)


def test_file_urls_are_decoded(media_dir: Path) -> None:
    """A file URL's %-escapes are decoded (as `Path.as_uri()` writes them); its host, if any,
    must be this machine; an escaped `..` is still resolved, then refused."""
    spaced = media_dir / "my cat.png"
    spaced.write_bytes(PNG)
    for url in (spaced.as_uri(), f"file://localhost{spaced}".replace(" ", "%20")):
        assert load_image_bytes(url, allowed_local_media_path=media_dir) == load_image_bytes(PNG)
    with pytest.raises(MediaError, match="names a local path"):
        load_image_bytes(f"file://otherhost{spaced}", allowed_local_media_path=media_dir)
    with pytest.raises(MediaError, match="outside the allowed local media path"):
        load_image_bytes(
            f"file://{media_dir}/%2E%2E/secret.png", allowed_local_media_path=media_dir
        )


def test_local_path_refused_without_allowed_folder(media_dir: Path) -> None:
    path = media_dir / "sub" / "cat.png"
    for source in (path, str(path), f"file://{path}"):
        with pytest.raises(MediaError, match="local image paths are not allowed"):
            load_image_bytes(source)


@pytest.mark.parametrize(
    "relative",
    ["../secret.png", "sub/../../secret.png", "link_out.png"],
)
def test_local_path_outside_allowed_folder(media_dir: Path, relative: str) -> None:
    """`..` and symlinks are resolved before the check, so neither escapes the folder."""
    (media_dir / "link_out.png").symlink_to(media_dir.parent / "secret.png")
    with pytest.raises(MediaError, match="outside the allowed local media path"):
        load_image_bytes(media_dir / relative, allowed_local_media_path=media_dir)
    with pytest.raises(MediaError, match="outside the allowed local media path"):
        load_image_bytes(f"file://{media_dir / relative}", allowed_local_media_path=media_dir)


def test_allowed_folder_prefix_is_not_enough(media_dir: Path) -> None:
    """/x/allowed_evil is not under /x/allowed even though the string starts with it."""
    sibling = media_dir.parent / (media_dir.name + "_evil")
    sibling.mkdir()
    (sibling / "cat.png").write_bytes(PNG)
    with pytest.raises(MediaError, match="outside"):
        load_image_bytes(sibling / "cat.png", allowed_local_media_path=media_dir)


def test_local_path_missing_or_not_an_image(media_dir: Path) -> None:
    with pytest.raises(MediaError, match="cannot read"):
        load_image_bytes(media_dir / "missing.png", allowed_local_media_path=media_dir)
    with pytest.raises(MediaError, match="cannot read"):
        load_image_bytes(media_dir / "sub", allowed_local_media_path=media_dir)  # a folder
    (media_dir / "notes.png").write_text("not an image")  # read as is: the worker's decode fails it
    data, _ = load_image_bytes(media_dir / "notes.png", allowed_local_media_path=media_dir)
    assert data == b"not an image"


# ---- hashes ----


def test_same_bytes_same_hash_whatever_the_source(media_dir: Path) -> None:
    path = media_dir / "sub" / "cat.png"
    hashes = {
        mm_hash(PNG),
        mm_hash(bytes(PNG)),
        mm_hash(data_url(PNG)),
        mm_hash(path, allowed_local_media_path=media_dir),
    }
    assert len(hashes) == 1
    (digest,) = hashes
    assert len(digest) == 64 and int(digest, 16) >= 0  # a full 256-bit hex digest


def test_different_images_different_hashes() -> None:
    other = random_image(23, 17, seed=2)
    assert mm_hash(PNG) != mm_hash(encode(other))
    assert hash_pil_image(IMAGE) != hash_pil_image(other)


def test_one_pixel_changes_the_hash() -> None:
    changed = IMAGE.copy()
    changed.putpixel((0, 0), tuple(255 - c for c in IMAGE.getpixel((0, 0))))
    assert hash_pil_image(IMAGE) != hash_pil_image(changed)
    assert mm_hash(PNG) != mm_hash(encode(changed))


def test_pil_hash_follows_pixels() -> None:
    """Equal pixels hash equal (a copy, a lazily opened file); the same bytes laid out in another
    shape do not (the size is part of the hashed header)."""
    assert hash_pil_image(IMAGE) == hash_pil_image(IMAGE.copy())
    assert hash_pil_image(IMAGE) == hash_pil_image(Image.open(io.BytesIO(PNG)))
    flat = np.asarray(IMAGE).reshape(-1, 3)  # 391 = 17 * 23 pixels
    wide = Image.fromarray(flat.reshape(17, 23, 3))
    tall = Image.fromarray(flat.reshape(23, 17, 3))
    assert wide.tobytes() == tall.tobytes()
    assert hash_pil_image(wide) != hash_pil_image(tall)


def test_pil_hash_includes_the_mode() -> None:
    """An RGB image and a 3-byte-per-pixel image of another mode with the same buffer differ."""
    ycbcr = Image.frombytes("YCbCr", IMAGE.size, IMAGE.tobytes())
    assert ycbcr.tobytes() == IMAGE.tobytes()
    assert hash_pil_image(ycbcr) != hash_pil_image(IMAGE)


def test_same_pixels_other_encoding_hashes_by_bytes() -> None:
    """The hash is over the raw bytes, as DESIGN.md says: a PNG and a BMP of one image differ."""
    assert mm_hash(encode(IMAGE, "PNG")) != mm_hash(encode(IMAGE, "BMP"))


# ---- http(s) URLs ----


def test_http_urls(media_http: tuple) -> None:
    base, handler = media_http
    port = base.rsplit(":", 1)[1]
    handler.files["/cat.png"] = PNG
    handler.files["/big.bin"] = b"x" * 5000
    handler.redirects["/here"] = f"{base}/cat.png"
    handler.redirects["/away"] = f"http://localhost:{port}/cat.png"  # same server, other host
    fetch = UrlFetch(allowed_domains=("127.0.0.1",), timeout_s=5.0, max_bytes=4096)

    assert load_image_bytes(f"{base}/cat.png", fetch=fetch) == load_image_bytes(PNG)
    assert load_image_bytes(f"{base}/here", fetch=fetch) == load_image_bytes(PNG)
    failures = [
        (f"{base}/away", "host 'localhost' is not allowed"),
        (f"http://localhost:{port}/cat.png", "host 'localhost' is not allowed"),
        (f"{base}/big.bin", "5000 bytes, over 4096"),
        (f"{base}/missing.png", "cannot fetch.*404"),
        ("http://127.0.0.1:1/a.png", "cannot fetch"),  # nothing listens there
    ]
    for url, match in failures:
        with pytest.raises(MediaError, match=match) as info:
            load_image_bytes(url, fetch=fetch)
        assert info.value.code == "invalid_media"
    with pytest.raises(MediaError, match="not allowed.*--allowed-media-domains"):
        load_image_bytes(f"{base}/cat.png", fetch=UrlFetch())  # no domains allowed by default
    with pytest.raises(MediaError, match="unsupported image source"):
        load_image_bytes(f"{base}/cat.png")  # no fetching at all (the offline LLM)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_pil_hash_is_the_header_and_pixel_bytes_hashed_as_one(mode: str) -> None:
    """Hashed in parts (no joined copy), the digest is that of header + tobytes(), for modes
    whose numpy view is the raw bytes."""
    image = IMAGE.convert(mode)
    header = f"{image.mode}:{image.size}".encode()
    assert hash_pil_image(image) == hash_media(header + image.tobytes())
    assert hash_pil_image(image, np.asarray(image)) == hash_pil_image(image)  # the LLM's reuse
    assert hash_media([b"ab", b"cd"]) == hash_media(b"abcd")
