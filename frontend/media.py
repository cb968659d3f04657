"""Media loading for the frontend: data URLs, bytes, local files -> the raw encoded bytes + hash.

The frontend never decodes: it only finds an item's bytes and hashes them (DESIGN.md section 2);
a preprocess worker decodes them (`preprocess_worker/processors.py`). Bytes that are not an image
therefore pass here and fail there, as their own request's `MediaError`. What fails here is the
source itself (a malformed data URL, a path outside the allowed folder, an unreadable file, a
URL whose host is not allowed or that cannot be fetched in time or within the size cap).

http(s) URLs are fetched with stdlib urllib, blocking: the frontend calls this in a thread.

A PIL image has no raw bytes: only the in-process `LLM` is given one, and hashes its pixels with
`hash_pil_image`. (The SDK encodes PIL images to bytes before sending them.)
"""

import base64
import binascii
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from mm_runtime.shared.errors import MediaError
from mm_runtime.shared.hashing import hash_media

ImageSource = bytes | str | Path  # raw bytes, a data URL, a local path, a file:// or http(s) URL


@dataclass(frozen=True, slots=True)
class UrlFetch:
    """Which http(s) URLs may be fetched, and how (FrontendConfig's media fields)."""

    allowed_domains: tuple[str, ...] = ()  # exact host names, lower case; none: no fetching
    timeout_s: float = 10.0
    max_bytes: int = 32 * 2**20


def load_image_bytes(
    source: ImageSource,
    allowed_local_media_path: Path | None = None,
    fetch: UrlFetch | None = None,
) -> tuple[bytes, str]:
    """Returns one image's encoded bytes, undecoded, and its mm_hash (over those bytes).

    Local paths (plain or file://) are read only from under `allowed_local_media_path`; http(s)
    URLs are fetched only from the hosts `fetch` allows (blocking, so call it in a thread);
    without `fetch` (the offline `LLM`) they are not supported at all.
    """
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, str) and source.startswith("data:"):
        data = _data_url_bytes(source)
    elif isinstance(source, Path) or (isinstance(source, str) and "://" not in source):
        data = _local_bytes(Path(source), allowed_local_media_path)
    elif isinstance(source, str) and source.startswith("file://"):
        data = _local_bytes(_file_url_path(source), allowed_local_media_path)
    elif (
        isinstance(source, str) and fetch is not None and source.startswith(("http://", "https://"))
    ):
        data = _fetch_bytes(source, fetch)
    elif isinstance(source, str):
        raise MediaError(f"unsupported image source {source[:40]!r}")
    else:
        raise MediaError(f"unsupported image source of type {type(source).__name__}")
    return data, hash_media(data)


def hash_pil_image(image: Image.Image, pixels: np.ndarray | None = None) -> str:
    """The mm_hash of an image given as pixels: over mode, size and the raw pixel bytes (the size
    is in the header so one buffer laid out in two shapes hashes apart). Hash the image exactly
    as it will be processed (the `LLM` passes the RGB conversion). `pixels`: `np.asarray(image)`
    when the caller has it already (each call copies PIL's bytes)."""
    header = f"{image.mode}:{image.size}".encode()
    return hash_media([header, np.asarray(image) if pixels is None else pixels])


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise MediaError("image data URLs must look like data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"image data URL is not valid base64: {e}") from e


def _file_url_path(url: str) -> Path:
    """file:///a/my%20cat.png -> /a/my cat.png: percent-escapes decoded, as `Path.as_uri()` and
    browsers write them (a `..` spelled %2e%2e is decoded too, then resolved and refused)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"a file URL names a local path, file:///path (got host {parts.netloc!r})")
    return Path(urllib.request.url2pathname(parts.path))


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


def _fetch_bytes(url: str, fetch: UrlFetch) -> bytes:
    _check_host(url, fetch.allowed_domains)
    opener = urllib.request.build_opener(_CheckedRedirects(fetch.allowed_domains))
    try:
        with opener.open(url, timeout=fetch.timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > fetch.max_bytes:
                raise MediaError(f"{url[:100]} is {length} bytes, over {fetch.max_bytes}")
            data = response.read(fetch.max_bytes + 1)  # no length: stop one byte past the cap
    except MediaError:
        raise
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, malformed URLs
        raise MediaError(f"cannot fetch {url[:100]}: {e}") from e
    if len(data) > fetch.max_bytes:
        raise MediaError(f"{url[:100]} is over {fetch.max_bytes} bytes")
    return data


def _check_host(url: str, allowed_domains: tuple[str, ...]) -> None:
    host = (urlsplit(url).hostname or "").lower()
    if host not in allowed_domains:
        raise MediaError(
            f"image URL host {host!r} is not allowed: the server fetches http(s) media only "
            "from the hosts in --allowed-media-domains"
        )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect must stay on allowed hosts too, or one allowed host could point anywhere."""

    def __init__(self, allowed_domains: tuple[str, ...]) -> None:
        self.allowed_domains = allowed_domains

    def redirect_request(  # type: ignore[override]
        self,
        req: urllib.request.Request,
        fp: object,
        code: int,
        msg: str,
        headers: object,
        newurl: str,
    ) -> urllib.request.Request | None:
        _check_host(newurl, self.allowed_domains)
        return super().redirect_request(req, fp, code, msg, headers, newurl)  # type: ignore[arg-type]
