"""The GPU issue's acceptance 4: the server, started on the GPU with a real-size model (Qwen2-VL-2B,
dummy weights), serves the largest request its limits allow beside ordinary ones, without running
out of memory.

The largest request: 4 images (the default --limit-mm-per-prompt) of 8100 encoder tokens each,
just under the 8192 the encoder cache admits per item, 32.4k prompt tokens of the 32768 the model
takes. The cache holds one such item at a time, so the scheduler must encode and consume the
images one after another across chunked-prefill steps.
"""

import asyncio
from pathlib import Path

import numpy as np
import pytest
from mm_testing import RunningServer, prompt_text, random_image
from PIL import Image

from mm_runtime.frontend.sdk import AsyncClient
from mm_runtime.shared.model_dirs import write_model_dir
from mm_runtime.shared.wire import SamplingParams

pytestmark = pytest.mark.gpu
CONFIG = Path(__file__).resolve().parents[1] / "bench" / "configs" / "qwen2_vl_2b.json"


def smooth_image(side: int, seed: int) -> Image.Image:
    """A large image that compresses (a gradient): the request stays a few MB on the wire."""
    ramp = np.linspace(0, 255, side).astype(np.uint8)
    red = np.broadcast_to(ramp[None, :], (side, side))  # left to right
    green = np.broadcast_to(ramp[:, None], (side, side))  # top to bottom
    blue = np.full((side, side), 40 * seed, dtype=np.uint8)  # one tint per image
    return Image.fromarray(np.stack([red, green, blue], axis=-1))


def test_largest_request_beside_ordinary_ones(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "qwen2-vl-2b", CONFIG)
    server = RunningServer(model_dir, device="cuda", dtype="bfloat16", load_format="dummy")
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    # 2520 = 90 merged tokens of 28 pixels: 8100 tokens per image.
    largest = [smooth_image(2520, seed) for seed in range(4)]

    async def run() -> list:
        async def one(images: list[Image.Image], question: str) -> object:
            async with AsyncClient(server.address, timeout_s=600) as client:
                return await client.generate(
                    prompt_text("qwen2_vl", question, len(images)), images, params
                )

        ordinary = [one([random_image(640, 480, seed=i)], f"What is {i}?") for i in range(16)]
        results = await asyncio.gather(one(largest, "Compare the four pictures."), *ordinary)
        async with AsyncClient(server.address, timeout_s=60) as client:
            return [*results, await client.health()]  # the GPU worker is alive

    try:
        *results, health = asyncio.run(run())
        assert [len(r.token_ids) for r in results] == [32] * 17
        assert results[0].usage.prompt_tokens > 32_000  # the worst case, media tokens included
        assert health["mm_runtime_requests_running"] == 0
    finally:
        server.close()
