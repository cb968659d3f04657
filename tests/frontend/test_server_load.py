"""The server under load: a client that disconnects mid-stream frees its KV blocks (acceptance
5); a burst of big-image requests being preprocessed does not stall the decode steps of a
running request (acceptance 6, figures printed with -s)."""

import asyncio
import statistics
import time
from pathlib import Path

import pytest
import zmq
from mm_testing import RunningServer, prompt_text, random_image

from mm_runtime import SamplingParams
from mm_runtime.frontend.sdk import AsyncClient, media_bytes
from mm_runtime.shared.wire import FrontendReply, GenerateRequest, ImageBytesPart, RequestDelta
from mm_runtime.shared.zmq_io import MessageCodec, send

ARCH = "qwen2_vl"


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, Path]):  # noqa: ANN201
    running = RunningServer(tiny_models[ARCH], preprocess_workers=1)
    yield running
    running.close()


def wait_for(predicate: object, timeout_s: float) -> float:
    """Seconds until predicate() holds; fails after timeout_s."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_disconnect_mid_stream_frees_kv_blocks(server: RunningServer) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(server.address)
    params = SamplingParams(max_tokens=3500, temperature=0, ignore_eos=True)
    text = prompt_text(ARCH, "Tell me a very long story.", 1)
    image = ImageBytesPart(media_bytes(random_image(64, 64, seed=1)))
    request = GenerateRequest(
        req_id="long", prompt=text, images=[image], sampling_params=params, stream=True
    )
    send(sock, MessageCodec(), request)
    codec = MessageCodec(FrontendReply)
    num_deltas = 0
    while num_deltas < 5:
        reply = codec.decode(sock.recv_multipart(copy=False))
        num_deltas += isinstance(reply, RequestDelta)
    before = server.stats()
    assert before["mm_runtime_requests_running"] == 1
    assert before["kv_num_free_blocks"] < before["kv_num_blocks"] - 1
    sock.close(linger=0)  # the client vanishes: no abort message
    ctx.term()
    elapsed = wait_for(lambda: server.stats()["mm_runtime_requests_running"] == 0, 15)
    after = server.stats()
    assert after["kv_num_free_blocks"] == after["kv_num_blocks"] - 1  # all blocks back
    assert (
        after["mm_runtime_requests_aborted_total"]
        == before["mm_runtime_requests_aborted_total"] + 1
    )
    print(f"\nKV blocks freed {elapsed:.2f} s after the client disconnected")


def test_big_image_burst_does_not_stall_decoding(server: RunningServer) -> None:
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    big = [media_bytes(random_image(2048, 2048, seed=s)) for s in range(6)]
    burst_params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)

    async def run() -> tuple[list[float], float, float]:
        arrivals: list[float] = []
        burst: dict[str, float] = {}

        async def decode() -> None:
            async with AsyncClient(server.address, timeout_s=120) as client:
                async for _ in client.stream(
                    prompt_text(ARCH, "Count to a thousand.", 0), None, params
                ):
                    arrivals.append(time.monotonic())
                    if len(arrivals) == 60:
                        burst["start"] = time.monotonic()
                        asyncio.ensure_future(images())

        async def images() -> None:
            async with AsyncClient(server.address, timeout_s=120) as client:
                text = prompt_text(ARCH, "What is this?", 1)
                await asyncio.gather(*(client.generate(text, [b], burst_params) for b in big))
            burst["end"] = time.monotonic()

        await decode()
        while "end" not in burst:
            await asyncio.sleep(0.05)
        return arrivals, burst["start"], burst["end"]

    arrivals, start, end = asyncio.run(run())
    gaps = [(b - a, b) for a, b in zip(arrivals, arrivals[1:], strict=False)]
    before = [g for g, t in gaps[10:59]]
    during = [g for g, t in gaps if start < t <= end]
    assert end > start and len(during) >= 5, "the burst ended before the decode did"
    p90 = lambda xs: statistics.quantiles(xs, n=10)[-1]  # noqa: E731
    ms = lambda x: f"{1000 * x:.1f} ms"  # noqa: E731
    print(
        f"\ndecode step interval before the burst: median {ms(statistics.median(before))},"
        f" p90 {ms(p90(before))}; during ({end - start:.2f} s, {len(during)} steps):"
        f" median {ms(statistics.median(during))}, p90 {ms(p90(during))}, max {ms(max(during))}"
    )
    # Generous: this machine has 2 cores shared by the test, the frontend, a preprocess worker
    # and the GPU worker, so contention slows steps; a blocked loop would stop them for the
    # whole burst (seconds), far above this bound.
    assert statistics.median(during) < 5 * statistics.median(before) + 0.05
    assert max(during) < 1.0
