"""Media loading for the frontend: data URLs, bytes, local files, PIL images -> RGB image + hash.

Every failure becomes a `MediaError` naming the problem (corrupt bytes, an empty image, a path
outside the allowed folder), so a bad image fails its own request and nothing else.
"""

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mm_runtime.shared.errors import MediaError
from mm_runtime.shared.hashing import hash_media

ImageSource = Image.Image | bytes | str | Path


@dataclass(frozen=True, slots=True)
class LoadedImage:
    image: Image.Image  # RGB, fully decoded
    mm_hash: str  # over the raw bytes (or decoded pixels, for a PIL image given directly)


def _decode(data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now: a truncated file fails here, not in the processor
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"cannot decode image ({len(data)} bytes): {e}") from e


def _convert_pil(image: Image.Image) -> Image.Image:
    try:
        # A lazily opened image (Image.open) decodes here: a truncated file fails now.
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"cannot decode image ({image.width}x{image.height}): {e}") from e


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


def load_image(source: ImageSource, allowed_local_media_path: Path | None = None) -> LoadedImage:
    """Loads one image from a PIL image, raw bytes, a data URL, or a local path/file:// URL."""
    if isinstance(source, Image.Image):
        image = _convert_pil(source)
        header = f"{image.mode}:{image.size}".encode()
        mm_hash = hash_media(header + image.tobytes())
    else:
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
        image = _decode(data)
        mm_hash = hash_media(data)
    if image.width == 0 or image.height == 0:
        raise MediaError(f"image has no pixels ({image.width}x{image.height})")
    return LoadedImage(image, mm_hash)
