"""Test helpers: the Hugging Face reference, random images and prompts for the tiny models.

The reference is transformers' own `generate` on the same directory, in float32 on CPU, one
request at a time (no padding), so any batching effect on our side shows up as a mismatch.
"""

import copy
import struct
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from mm_runtime.shared.model_info import IMAGE_PLACEHOLDERS

ARCHS = ["llava", "qwen2_vl"]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def handmade_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; PIL refuses to write a 0x0 one itself."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def prompt_text(arch: str, question: str, num_images: int) -> str:
    images = " ".join([IMAGE_PLACEHOLDERS[arch]] * num_images)
    return f"USER: {images}\n{question} ASSISTANT:"


def mm_prompt(text: str, images: list[Image.Image]) -> dict[str, object]:
    return {"prompt": text, "multi_modal_data": {"image": images}}


@cache
def _hf(model_dir: str) -> tuple[object, object]:
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    return processor, model


def hf_greedy(
    model_dir: str | Path,
    text: str,
    images: list[Image.Image],
    max_new_tokens: int = 32,
    add_special_tokens: bool = True,
) -> list[int]:
    """Hugging Face's greedy tokens for one request, never stopping at EOS (like ignore_eos)."""
    processor, model = _hf(str(model_dir))
    inputs = processor(
        text=text, images=images or None, return_tensors="pt", add_special_tokens=add_special_tokens
    )
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None  # generate through EOS, as our ignore_eos does
    config.max_new_tokens = max_new_tokens
    config.do_sample = False
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def http_post(
    url: str, body: bytes, headers: dict[str, str] | None = None, timeout_s: float = 60
) -> tuple[int, dict]:
    """POST raw bytes (JSON by default) past any client-side checks: (status, JSON reply),
    error statuses included."""
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"} if headers is None else headers
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """The real server (frontend in a background event loop of this process, GPU and preprocess
    workers as child processes), so tests can also look inside the frontend."""

    def __init__(self, model_dir: str | Path, **gpu_kwargs: object) -> None:
        import asyncio
        import threading

        from mm_runtime.launcher import build_frontend
        from mm_runtime.shared.config import FrontendConfig, GpuWorkerConfig

        frontend_fields = set(FrontendConfig.__dataclass_fields__) - {"model", "zmq_port"}
        frontend_kwargs = {k: gpu_kwargs.pop(k) for k in frontend_fields & set(gpu_kwargs)}
        self.port = free_port()
        self.frontend = build_frontend(
            FrontendConfig(model=str(model_dir), zmq_port=self.port, **frontend_kwargs),
            GpuWorkerConfig(model=str(model_dir), **{"device": "cpu", **gpu_kwargs}),
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        try:
            self.call(self.frontend.start(), timeout_s=300)
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def call(self, coro: object, timeout_s: float = 60) -> object:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stats(self) -> dict[str, float]:
        ok, stats, _ = self.call(self.frontend.stats())
        assert ok
        return stats

    def close(self) -> None:
        self.call(self.frontend.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def assert_openai_error(body: dict, code: str) -> dict:
    """`body` is OpenAI's error object with `code`; returns its `error` member."""
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error
