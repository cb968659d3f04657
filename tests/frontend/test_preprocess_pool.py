"""PreprocessPool with real worker processes (spawned as the launcher spawns them).

One pool of two workers serves the module, in one event loop, the tests in order: concurrent
jobs equal the processor in-process bit for bit; a bad item fails alone; a worker killed with a
job in hand is replaced and the job retried; a job whose retry is killed too fails cleanly;
garbage on the pool's socket is dropped; `close()` leaves no process behind (last).
"""

import asyncio
import functools
import io
import multiprocessing
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest
import torch
import zmq
from mm_testing import random_image

from mm_runtime.frontend.preprocess_pool import TERMINATE_GRACE_S, PreprocessPool
from mm_runtime.preprocess_worker.processors import ImageProcessor
from mm_runtime.preprocess_worker.worker import run_preprocess_worker
from mm_runtime.shared.errors import MediaError, PreprocessError
from mm_runtime.shared.model_info import ModelInfo
from mm_runtime.shared.wire import (
    PROTOCOL_VERSION,
    PreprocessReady,
    PreprocessResult,
)
from mm_runtime.shared.zmq_io import IpcPaths, MessageCodec

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

ARCH = "llava"  # the worker tests use qwen2_vl
NUM_WORKERS = 2
T = TypeVar("T")


def png(width: int, height: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    random_image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


# Slow enough (~0.3 s to decode and resize) that a kill right after dispatch finds it in hand.
BIG_PNG = png(2500, 2500, seed=99)


@dataclass
class Harness:
    pool: PreprocessPool
    spawned: list[BaseProcess]  # every process spawn_worker made
    processor: ImageProcessor  # the reference, in-process
    loop: asyncio.AbstractEventLoop

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def check(self, result: PreprocessResult, data: bytes) -> None:
        expected = self.processor.process_bytes(data)
        assert result.num_tokens == expected.num_tokens > 0
        assert result.tensors.keys() == expected.tensors.keys()
        for key, tensor in expected.tensors.items():
            got = result.tensors[key]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
            assert torch.equal(got, tensor), key  # bit for bit

    def process_all(self, images: list[bytes]) -> list[PreprocessResult]:
        async def run() -> list[PreprocessResult]:
            return await asyncio.gather(*(self.pool.process("image", d) for d in images))

        return self.run(run())

    def stat(self, name: str) -> float:
        return self.pool.stats()[name]

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out; stats {self.pool.stats()}"
            await asyncio.sleep(0.01)

    async def kill_worker_holding_a_job(self, exclude: set[int] = frozenset()) -> int:
        """SIGKILLs the (one) worker with a job in flight, other than `exclude`; its pid."""
        await self.wait_for(lambda: any(n and p not in exclude for p, n in self.in_flight()))
        (pid,) = [p for p, n in self.in_flight() if n and p not in exclude]
        os.kill(pid, signal.SIGKILL)
        return pid

    def in_flight(self) -> list[tuple[int, int]]:
        return list(self.pool.in_flight().items())


def spawn_worker(
    ctx: multiprocessing.context.SpawnContext, model_dir: str, address: str, spawned: list
) -> BaseProcess:
    """What the launcher passes, plus a record of each process for the checks."""
    process = ctx.Process(
        target=run_preprocess_worker, args=(model_dir, address), daemon=True, name="preprocess"
    )
    spawned.append(process)
    return process


@pytest.fixture(scope="module")
def harness(tiny_models: dict[str, Path]) -> Iterator[Harness]:
    model_dir = str(tiny_models[ARCH])
    ipc = IpcPaths.create()
    loop = asyncio.new_event_loop()
    spawned: list[BaseProcess] = []
    ctx = multiprocessing.get_context("spawn")
    factory = functools.partial(spawn_worker, ctx, model_dir, ipc.preprocess, spawned)
    pool = PreprocessPool(ipc.preprocess, NUM_WORKERS, factory)
    try:
        loop.run_until_complete(pool.start(timeout_s=60))
        processor = ImageProcessor(ModelInfo.from_model_dir(model_dir))
        yield Harness(pool, spawned, processor, loop)
    finally:
        loop.run_until_complete(pool.close())
        loop.close()
        ipc.remove()
        for process in spawned:  # only if a test failed before close() could run
            try:
                process.kill()
            except ValueError:
                pass  # closed by the pool: already reaped


def test_starts_all_workers(harness: Harness) -> None:
    stats = harness.pool.stats()
    assert stats["workers_ready"] == NUM_WORKERS
    assert sorted(harness.pool.in_flight()) == sorted(p.pid for p in harness.spawned)
    assert all(p.name == "preprocess" for p in harness.spawned)


def test_many_images_concurrently(harness: Harness) -> None:
    images = [png(16 + 7 * i, 80 - 3 * i, seed=i) for i in range(24)]
    done_before = harness.stat("jobs_done")

    async def run() -> list[PreprocessResult]:
        tasks = [asyncio.create_task(harness.pool.process("image", d)) for d in images]
        await asyncio.sleep(0)  # every job is queued or dispatched now
        # Each worker holds one job, the others wait their turn in the frontend.
        assert list(harness.pool.in_flight().values()) == [1] * NUM_WORKERS
        assert harness.stat("jobs_queued") == len(images) - NUM_WORKERS
        return await asyncio.gather(*tasks)

    results = harness.run(run())
    for result, data in zip(results, images, strict=True):
        harness.check(result, data)
    assert len({r.job_id for r in results}) == len(images)
    assert harness.stat("jobs_done") == done_before + len(images)
    assert harness.stat("busy_seconds") > 0
    assert harness.stat("jobs_in_flight") == harness.stat("jobs_queued") == 0


def test_bad_item_fails_alone(harness: Harness) -> None:
    pids = set(harness.pool.in_flight())
    failed_before = harness.stat("jobs_failed")
    cases = [
        ("image", b"hello world", r"cannot decode image \(11 bytes\)"),
        ("image", BIG_PNG[:5000], "truncated"),
        ("audio", png(8, 8), "unsupported modality 'audio'"),
    ]
    for modality, data, match in cases:
        with pytest.raises(MediaError, match=match) as info:
            harness.run(harness.pool.process(modality, data))
        assert info.value.code == "invalid_media"
    assert harness.stat("jobs_failed") == failed_before + len(cases)
    data = png(50, 40, seed=5)
    harness.check(harness.run(harness.pool.process("image", data)), data)
    assert set(harness.pool.in_flight()) == pids  # no worker died or was replaced


def test_cancelled_job_frees_its_worker(harness: Harness) -> None:
    """A caller that gives up (an aborted request): the worker's late reply is dropped."""

    async def run() -> PreprocessResult:
        task = asyncio.create_task(harness.pool.process("image", BIG_PNG))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await harness.pool.process("image", png(30, 30))

    harness.check(harness.run(run()), png(30, 30))
    harness.run(harness.wait_for(lambda: harness.stat("jobs_in_flight") == 0))


def test_killed_worker_is_replaced_and_its_job_retried(harness: Harness) -> None:
    before = harness.pool.stats()

    async def run() -> tuple[int, PreprocessResult]:
        task = asyncio.create_task(harness.pool.process("image", BIG_PNG))
        pid = await harness.kill_worker_holding_a_job()
        return pid, await task

    pid, result = harness.run(run())
    harness.check(result, BIG_PNG)
    stats = harness.pool.stats()
    assert stats["jobs_retried"] == before["jobs_retried"] + 1
    assert stats["workers_replaced"] == before["workers_replaced"] + 1
    assert pid not in harness.pool.in_flight()
    # Later jobs succeed, and the replacement joins: two workers again.
    data = png(40, 40, seed=6)
    harness.check(harness.run(harness.pool.process("image", data)), data)
    harness.run(harness.wait_for(lambda: harness.stat("workers_ready") == NUM_WORKERS))
    assert len(harness.pool.in_flight()) == NUM_WORKERS


def test_job_whose_retry_is_killed_too_fails(harness: Harness) -> None:
    before = harness.pool.stats()

    async def run() -> None:
        task = asyncio.create_task(harness.pool.process("image", BIG_PNG))
        first = await harness.kill_worker_holding_a_job()
        await harness.kill_worker_holding_a_job(exclude={first})  # the retry, on the other one
        with pytest.raises(PreprocessError, match="crashed twice") as info:
            await task
        assert info.value.code == "preprocess_failed"

    harness.run(run())
    stats = harness.pool.stats()
    assert stats["jobs_retried"] == before["jobs_retried"] + 1
    assert stats["jobs_failed"] == before["jobs_failed"] + 1
    assert stats["workers_replaced"] == before["workers_replaced"] + 2
    # Both workers died; the jobs that come now wait for the replacements, then succeed.
    images = [png(20, 20 + i, seed=i) for i in range(4)]
    results = harness.process_all(images)
    for result, data in zip(results, images, strict=True):
        harness.check(result, data)
    harness.run(harness.wait_for(lambda: harness.stat("workers_ready") == NUM_WORKERS))


def test_garbage_on_the_pool_socket_is_dropped(harness: Harness) -> None:
    """A rogue peer sends garbage, a result for a job it does not hold, and a Ready for a pid
    that is not a worker: nothing breaks, and no job is sent to it."""
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.linger = 0
    rogue.connect(harness.pool.address)
    version = bytes([PROTOCOL_VERSION])
    codec = MessageCodec()
    result = PreprocessResult(job_id=0, tensors={"x": torch.ones(3)}, num_tokens=1, seconds=0.1)
    try:
        rogue.send_multipart([b"garbage"])
        rogue.send_multipart([version, b"\xff\xfe"])
        rogue.send_multipart([version, msgspec.msgpack.encode({"type": "result"})])
        rogue.send_multipart(codec.encode(result))  # job 0 is long done, and not rogue's
        rogue.send_multipart(codec.encode(PreprocessReady(os.getpid())))
        images = [png(24, 24, seed=i) for i in range(6)]
        results = harness.process_all(images)
        for r, data in zip(results, images, strict=True):
            harness.check(r, data)
        assert rogue.poll(100) == 0  # the rogue got no job
        assert harness.stat("workers_ready") == NUM_WORKERS
    finally:
        rogue.close()
        ctx.term()


def test_close_leaves_no_process_behind(harness: Harness) -> None:
    """Last. Every process the pool ever started is stopped and reaped."""
    pids = list(harness.pool.in_flight())
    assert len(pids) == NUM_WORKERS
    start = time.monotonic()
    harness.run(harness.pool.close())
    assert time.monotonic() - start < TERMINATE_GRACE_S  # they stopped on SIGTERM, no SIGKILL
    for process in harness.spawned:
        with pytest.raises(ValueError, match="closed"):
            process.is_alive()  # the pool joined and closed it
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert multiprocessing.active_children() == []
    with pytest.raises(PreprocessError, match="not running"):
        harness.run(harness.pool.process("image", png(8, 8)))
    harness.run(harness.pool.close())  # idempotent


def test_start_fails_fast_when_a_worker_cannot_start(tmp_path: Path) -> None:
    """A worker that dies while starting (no model here) fails start(), leaving nothing."""
    ipc = IpcPaths.create()
    spawned: list[BaseProcess] = []
    ctx = multiprocessing.get_context("spawn")
    factory = functools.partial(spawn_worker, ctx, str(tmp_path), ipc.preprocess, spawned)
    pool = PreprocessPool(ipc.preprocess, 1, factory)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(PreprocessError, match=r"died while starting \(exit code 1\)"):
            loop.run_until_complete(pool.start(timeout_s=60))
        assert len(spawned) == 1
        with pytest.raises(ValueError, match="closed"):
            spawned[0].is_alive()
    finally:
        loop.run_until_complete(pool.close())
        loop.close()
        ipc.remove()
