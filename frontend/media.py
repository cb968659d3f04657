"""Media loading for the frontend: data URLs, bytes, local files -> the raw encoded bytes + hash.

The frontend never decodes: it only finds an item's bytes and hashes them (DESIGN.md section 2);
a preprocess worker decodes them (`preprocess_worker/processors.py`). Bytes that are not an image
therefore pass here and fail there, as their own request's `MediaError`. What fails here is the
source itself (a malformed data URL, a path outside the allowed folder, an unreadable file).

A PIL image has no raw bytes: only the in-process `LLM` is given one, and hashes its pixels with
`hash_pil_image`. (The SDK encodes PIL images to bytes before sending them.)
"""

import base64
import binascii
from pathlib import Path

from PIL import Image

from mm_runtime.shared.errors import MediaError
from mm_runtime.shared.hashing import hash_media

ImageSource = bytes | str | Path  # raw bytes, a data URL, a local path or a file:// URL


def load_image_bytes(
    source: ImageSource, allowed_local_media_path: Path | None = None
) -> tuple[bytes, str]:
    """Returns one image's encoded bytes, undecoded, and its mm_hash (over those bytes).

    Local paths (plain or file://) are read only from under `allowed_local_media_path`.
    """
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, str) and source.startswith("data:"):
        data = _data_url_bytes(source)
    elif isinstance(source, Path) or (isinstance(source, str) and "://" not in source):
        data = _local_bytes(Path(source), allowed_local_media_path)
    elif isinstance(source, str) and source.startswith("file://"):
        data = _local_bytes(Path(source.removeprefix("file://")), allowed_local_media_path)
    elif isinstance(source, str):
        raise MediaError(f"unsupported image source {source[:40]!r}")
    else:
        raise MediaError(f"unsupported image source of type {type(source).__name__}")
    return data, hash_media(data)


def hash_pil_image(image: Image.Image) -> str:
    """The mm_hash of an image given as pixels: over mode, size and the raw pixel bytes (the size
    is in the header so one buffer laid out in two shapes hashes apart). Hash the image exactly
    as it will be processed (the `LLM` passes the RGB conversion)."""
    header = f"{image.mode}:{image.size}".encode()
    return hash_media(header + image.tobytes())


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise MediaError("image data URLs must look like data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"image data URL is not valid base64: {e}") from e


def _local_bytes(path: Path, allowed_local_media_path: Path | None) -> bytes:
    if allowed_local_media_path is None:
        raise MediaError("local image paths are not allowed (no --allowed-local-media-path)")
    resolved = path.resolve()
    if not resolved.is_relative_to(allowed_local_media_path.resolve()):
        raise MediaError(f"{path} is outside the allowed local media path")
    try:
        return resolved.read_bytes()
    except OSError as e:
        raise MediaError(f"cannot read {path}: {e}") from e
