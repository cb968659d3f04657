"""The preprocess worker process, driven from a test ROUTER socket as the frontend would drive it.

One real worker (a fresh interpreter running the entry point, its log in a file) serves the whole
module: its replies equal the processor run in-process, bit for bit; a bad item fails its own
job; garbage on its socket is logged and dropped; it exits cleanly on SIGINT. `handle_job` is
also checked alone for the failures a real processor cannot be made to raise.
"""

import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import torch
import zmq
from mm_testing import random_image

from mm_runtime.preprocess_worker.processors import ImageProcessor
from mm_runtime.preprocess_worker.worker import handle_job
from mm_runtime.shared.errors import MediaError
from mm_runtime.shared.model_info import ModelInfo
from mm_runtime.shared.wire import (
    PROTOCOL_VERSION,
    ErrorInfo,
    PreprocessFailed,
    PreprocessJob,
    PreprocessReady,
    PreprocessReply,
    PreprocessResult,
)
from mm_runtime.shared.zmq_io import IpcPaths, MessageCodec

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

ARCH = "qwen2_vl"  # the pool tests use llava
RECV_TIMEOUT_MS = 60_000  # the worker imports torch and transformers before its Ready


def png(width: int, height: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    random_image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Worker:
    proc: subprocess.Popen
    sock: zmq.Socket  # the test's ROUTER
    identity: bytes  # the worker's routing id
    log: Path
    processor: ImageProcessor  # the same processor, in-process: the reference
    encoder: MessageCodec
    decoder: MessageCodec

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([self.identity, *frames])

    def send(self, job: PreprocessJob) -> None:
        self.sock.send_multipart([self.identity, *self.encoder.encode(job)])

    def recv(self) -> PreprocessReply:
        identity, *frames = self.sock.recv_multipart(copy=False)
        assert identity.bytes == self.identity
        return self.decoder.decode(frames)

    def run(self, job: PreprocessJob) -> PreprocessReply:
        self.send(job)
        reply = self.recv()
        assert reply.job_id == job.job_id
        return reply


@pytest.fixture(scope="module")
def worker(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    model_dir = str(tiny_models[ARCH])
    ipc = IpcPaths.create()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.rcvtimeo = RECV_TIMEOUT_MS
    sock.bind(ipc.preprocess)
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    code = (
        "import sys; from mm_runtime.preprocess_worker.worker import run_preprocess_worker as r; "
    )
    code += "r(sys.argv[1], sys.argv[2])"
    env = {**os.environ, "MM_RUNTIME_LOG_LEVEL": "debug"}
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, model_dir, ipc.preprocess], stderr=log_file, env=env
        )
    try:
        identity, *frames = sock.recv_multipart()
        ready = MessageCodec(PreprocessReply).decode(frames)
        assert ready == PreprocessReady(proc.pid)
        processor = ImageProcessor(ModelInfo.from_model_dir(model_dir))
        yield Worker(
            proc, sock, identity, log, processor, MessageCodec(), MessageCodec(PreprocessReply)
        )
    finally:
        proc.kill()
        proc.wait()
        sock.close()
        ctx.term()
        ipc.remove()


def assert_alive(worker: Worker) -> None:
    assert worker.proc.poll() is None, worker.log.read_text()


def test_results_equal_the_processor_in_process(worker: Worker) -> None:
    for job_id, (w, h) in enumerate([(64, 48), (23, 17), (40, 90), (200, 120)]):
        data = png(w, h, seed=job_id)
        reply = worker.run(PreprocessJob(job_id, "image", data))
        assert isinstance(reply, PreprocessResult), reply
        expected = worker.processor.process_bytes(data)
        assert reply.num_tokens == expected.num_tokens > 0
        assert reply.tensors.keys() == expected.tensors.keys() == {"pixel_values", "image_grid_thw"}
        for key, tensor in expected.tensors.items():
            got = reply.tensors[key]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
            assert torch.equal(got, tensor), key  # bit for bit (no NaNs in pixel values)
        assert 0 < reply.seconds < 30


@pytest.mark.parametrize(
    ("modality", "data", "match"),
    [
        ("image", b"hello world", r"cannot decode image \(11 bytes\)"),
        ("image", b"", r"cannot decode image \(0 bytes\)"),
        ("image", png(64, 64)[:200], "cannot decode image"),
        ("video", png(8, 8), "unsupported modality 'video'"),
    ],
    ids=["garbage", "empty", "truncated", "video"],
)
def test_bad_item_fails_its_job_only(
    worker: Worker, modality: str, data: bytes, match: str
) -> None:
    reply = worker.run(PreprocessJob(1000, modality, data))
    assert isinstance(reply, PreprocessFailed), reply
    assert reply.error.code == "invalid_media"
    assert reply.error.req_id == ""
    assert re.search(match, reply.error.message), reply.error.message
    assert_alive(worker)
    assert isinstance(worker.run(PreprocessJob(1001, "image", png(30, 30))), PreprocessResult)


def test_garbage_messages_are_dropped(worker: Worker) -> None:
    """None of these gets a reply, and none kills the worker: the next real job's reply is the
    first thing that comes back."""
    version = bytes([PROTOCOL_VERSION])
    job_body = msgspec.msgpack.encode(PreprocessJob(5, "image", b"x"))
    garbage = [
        [b"garbage"],  # one frame
        [b"", b""],
        [b"\x63", job_body],  # wrong protocol version
        [version, b"\xff\xfe\xfd"],  # not msgpack
        [version, msgspec.msgpack.encode({"type": "job", "job_id": "five"})],
        [version, msgspec.msgpack.encode(PreprocessReady(1))],  # a message of the other way
        [version, msgspec.msgpack.encode([1, 2, 3])],
        [os.urandom(64) for _ in range(5)],
    ]
    for frames in garbage:
        worker.send_frames(frames)
    reply = worker.run(PreprocessJob(2000, "image", png(32, 32)))
    assert isinstance(reply, PreprocessResult)
    assert_alive(worker)
    assert worker.log.read_text().count("dropped a malformed message") == len(garbage)


def test_log_level_comes_from_the_environment(worker: Worker) -> None:
    """MM_RUNTIME_LOG_LEVEL=debug: per-job lines, off at the default INFO, are in the log."""
    worker.run(PreprocessJob(3000, "image", b"not an image"))
    assert "job 3000 failed" in worker.log.read_text()


class _BrokenProcessor:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def process_bytes(self, data: bytes) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "code", "match"),
    [
        (KeyError("pixel_values"), "preprocess_failed", "unexpected error .* KeyError"),
        (MemoryError(), "preprocess_failed", "MemoryError"),
        (MediaError("too wide"), "invalid_media", "too wide"),
    ],
)
def test_any_exception_becomes_a_failed_reply(error: Exception, code: str, match: str) -> None:
    job = PreprocessJob(7, "image", b"data")
    reply = handle_job(_BrokenProcessor(error), job)  # type: ignore[arg-type]
    assert isinstance(reply, PreprocessFailed)
    assert reply.job_id == 7
    assert reply.error.code == code
    assert reply.error == ErrorInfo(code, reply.error.message, "")
    assert re.search(match, reply.error.message), reply.error.message


def test_sigint_stops_it_cleanly(worker: Worker) -> None:
    """Last: Ctrl-C reaches the workers too; they exit 0, with no traceback in their log."""
    assert_alive(worker)
    worker.proc.send_signal(signal.SIGINT)
    assert worker.proc.wait(timeout=10) == 0
    log = worker.log.read_text()
    assert "Traceback" not in log, log
    assert f"preprocess worker {worker.proc.pid} stopped" in log
