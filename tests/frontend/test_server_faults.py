"""Faults through the real server (issue 4): a killed preprocess worker and malformed messages.

Acceptance 4 (first half): `kill -9` of the preprocess worker holding a request's job: the job is
retried on the other worker and the request completes with the tokens of an undisturbed run (a
second kill, of the retry, fails it cleanly); the dead workers are replaced, later requests work.

Acceptance 7: malformed messages on every socket (the SDK ROUTER, the GPU worker's input, the
preprocess ROUTER, the GPU worker's output channel) are dropped with a logged error, or answered
`protocol_error` on the SDK socket, while a long streamed request and concurrent image requests
run to completion with exactly their undisturbed tokens; no process dies or is replaced.

An undisturbed run and a faulted run of "the same request" use the same pixels in two PNG
encodings: the bytes, hence the media hash, differ, so both are preprocessed (a feature-cache hit
would skip exactly the path under test) and both must give the same tokens.
"""

import asyncio
import io
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import pytest
import torch
import zmq
from mm_testing import ARCHS, RunningServer, prompt_text, random_image
from PIL import Image

from mm_runtime import SamplingParams
from mm_runtime.frontend.sdk import AsyncClient, Client
from mm_runtime.shared.errors import MMRuntimeError
from mm_runtime.shared.wire import (
    PROTOCOL_VERSION,
    AbortRequest,
    AddRequest,
    EngineOutput,
    EngineRequest,
    ErrorInfo,
    FrontendReply,
    GenerateRequest,
    HealthRequest,
    ImageBytesPart,
    MMItem,
    Ping,
    PlaceholderRange,
    PreprocessFailed,
    PreprocessReady,
    PreprocessResult,
    RequestFailed,
    StatsRequest,
    StepOutputs,
    WorkerReady,
    WorkerStats,
)
from mm_runtime.shared.zmq_io import MessageCodec

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
# Long enough to outlast every injection below (a few hundred ms) several times over on CPU.
LONG = SamplingParams(max_tokens=1200, temperature=0, ignore_eos=True)
NUM_WORKERS = 2  # RunningServer's default preprocess workers
VERSION = bytes([PROTOCOL_VERSION])
BAD_VERSION = bytes([PROTOCOL_VERSION + 1])
SERVER_LOG = "mm_runtime.frontend.server"
POOL_LOG = "mm_runtime.frontend.preprocess_pool"


@pytest.fixture(scope="module", params=ARCHS)
def served(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Iterator[tuple]:
    arch = request.param
    server = RunningServer(tiny_models[arch])
    yield arch, server
    server.close()


def png(image: Image.Image, compress_level: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def two_encodings(image: Image.Image) -> tuple[bytes, bytes]:
    """The same pixels as two different byte strings (two media hashes)."""
    first, second = png(image, 1), png(image, 0)
    assert first != second
    return first, second


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def in_flight(server: RunningServer) -> dict[int, int]:
    """pid -> jobs in flight of every live preprocess worker, read in the frontend's loop."""
    return pool_state(server)[0]


def pool_state(server: RunningServer) -> tuple[dict[int, int], dict[str, float]]:
    async def read() -> tuple[dict[int, int], dict[str, float]]:
        return server.frontend.pool.in_flight(), server.frontend.pool.stats()

    return server.call(read())  # type: ignore[return-value]


def kill_worker_holding_a_job(server: RunningServer, exclude: frozenset[int] = frozenset()) -> int:
    """SIGKILLs the preprocess worker (not in `exclude`) with a job in hand; its pid."""
    holders: list[int] = []

    def found() -> bool:
        holders[:] = [pid for pid, n in in_flight(server).items() if n and pid not in exclude]
        return bool(holders)

    wait_for(found, "a preprocess worker with a job in flight")
    os.kill(holders[0], signal.SIGKILL)
    return holders[0]


def wait_for_replacements(server: RunningServer, killed: set[int]) -> set[int]:
    """Waits until NUM_WORKERS workers are ready again, none of them a killed one; their pids."""

    def replaced() -> bool:
        pids, stats = pool_state(server)
        ready = stats["workers_ready"]
        return len(pids) == NUM_WORKERS and not set(pids) & killed and ready == NUM_WORKERS

    wait_for(replaced, "the killed preprocess workers to be replaced")
    return set(in_flight(server))


def log_count(caplog: pytest.LogCaptureFixture, logger: str, text: str) -> int:
    return sum(r.name == logger and text in r.getMessage() for r in caplog.records)


# ---- acceptance 4: kill -9 of a preprocess worker ----------------------------------------------


def test_killed_preprocess_worker_job_is_retried(
    served: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    arch, server = served
    caplog.set_level(logging.WARNING)
    text = prompt_text(arch, "Describe the picture.", 1)
    undisturbed, faulted = two_encodings(random_image(2048, 2048, seed=11))
    with Client(server.address, timeout_s=120) as client:
        expected = client.generate(text, [undisturbed], GREEDY)
    before = server.stats()
    pids_before = set(in_flight(server))

    with Client(server.address, timeout_s=120) as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.generate, text, [faulted], GREEDY)
        killed = kill_worker_holding_a_job(server)
        done = pending.result(timeout=120)
    assert killed in pids_before
    assert done.token_ids == expected.token_ids and done.finish_reason == "length"

    after = server.stats()
    assert after["preprocess_jobs_retried"] == before["preprocess_jobs_retried"] + 1
    assert after["preprocess_workers_replaced"] == before["preprocess_workers_replaced"] + 1
    assert after["preprocess_jobs_failed"] == before["preprocess_jobs_failed"]
    assert log_count(caplog, POOL_LOG, f"preprocess worker {killed} died") == 1
    pids = wait_for_replacements(server, {killed})
    assert len(pids - pids_before) == 1  # one new worker beside the survivor

    # Later requests succeed, two at once (so the new worker likely takes one of the jobs).
    later = [random_image(2048, 2048, seed=s) for s in (12, 13)]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_generate, server, text, png(im, 0)) for im in later]
        outs = [f.result(timeout=120) for f in futures]
    assert all(len(o.token_ids) == 16 for o in outs)
    final = server.stats()
    assert final["preprocess_jobs_done"] == after["preprocess_jobs_done"] + 2
    assert final["preprocess_workers_replaced"] == after["preprocess_workers_replaced"]
    assert final["frontend_requests_in_flight"] == 0 and final["mm_runtime_requests_running"] == 0


def test_job_whose_retry_is_killed_too_fails_cleanly(served: tuple) -> None:
    """Two workers killed on the same item: that request fails with a clean error (a poisonous
    item cannot kill workers forever); both are replaced and the server goes on."""
    arch, server = served
    text = prompt_text(arch, "What is it?", 1)
    image = png(random_image(2048, 2048, seed=21), 0)
    before = server.stats()
    with Client(server.address, timeout_s=120) as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.generate, text, [image], GREEDY)
        first = kill_worker_holding_a_job(server)
        second = kill_worker_holding_a_job(server, exclude=frozenset({first}))
        with pytest.raises(MMRuntimeError) as err:
            pending.result(timeout=120)
    assert err.value.code == "preprocess_failed" and "crashed twice" in err.value.message
    wait_for_replacements(server, {first, second})
    after = server.stats()
    assert after["preprocess_workers_replaced"] == before["preprocess_workers_replaced"] + 2
    # The same image again (its failed job left nothing behind) and another one both work.
    outs = [_generate(server, text, data) for data in (image, png(random_image(64, 64, 22), 0))]
    assert all(len(o.token_ids) == 16 for o in outs)
    assert server.frontend.gpu_process.is_alive()


def _generate(server: RunningServer, text: str, image: bytes) -> object:
    with Client(server.address, timeout_s=120) as client:
        return client.generate(text, [image], GREEDY)


# ---- acceptance 7: malformed messages on every socket ------------------------------------------


def _encode(msg: msgspec.Struct) -> list[bytes]:
    return [bytes(f) for f in MessageCodec().encode(msg)]


def _raw(body: object) -> list[bytes]:
    return [VERSION, msgspec.msgpack.encode(body)]


def _add_request(req_id: str, tensor: object = None, drop_frame_bytes: int = 0) -> list[bytes]:
    """An AddRequest with one feature-cache miss item; `tensor` replaces its TensorRef, and
    `drop_frame_bytes` cuts that many bytes off the tensor's frame."""
    pixels = torch.zeros(1, 3, 42, 42)  # 21 KB: travels as its own frame
    item = MMItem(
        modality="image",
        mm_hash=f"fault-{req_id}" + "0" * 48,
        placeholder=PlaceholderRange(1, 9),
        tensors={"pixel_values": pixels},
    )
    request = EngineRequest(
        req_id=req_id, prompt_token_ids=[1] * 12, sampling_params=GREEDY, mm_items=[item]
    )
    frames = _encode(AddRequest(request=request, feature_epoch=0))
    if tensor is not None:
        body = msgspec.msgpack.decode(frames[1])
        body["request"]["mm_items"][0]["tensors"]["pixel_values"] = tensor
        frames[1] = msgspec.msgpack.encode(body)
    if drop_frame_bytes:
        frames[2] = frames[2][:-drop_frame_bytes]
    return frames


# A zero-element tensor whose other dimensions overflow int64 once multiplied: the byte count
# (0) matches its empty frame, so only building the tensor can reject it.
OVERFLOWING_EMPTY_TENSOR = ["float32", [2**40, 2**40, 0], -1, b""]


def _generate_body(req_id: object, **fields: object) -> dict[str, object]:
    return {"type": "generate", "req_id": req_id, "prompt": "USER: hi ASSISTANT:", **fields}


def sdk_faults(address: str, arch: str) -> tuple[list[object], int]:
    """Malformed messages on the SDK socket from a raw DEALER, then well-formed requests that
    cannot be served. Each is answered: a protocol error (no req_id is known yet), or a clean
    failure of the request it names. Returns the replies that disagree with that (all of them,
    for the assertion message) and the number of malformed messages."""
    invalid_utf8 = _raw(_generate_body("\x00\x00\x00"))
    invalid_utf8[1] = invalid_utf8[1].replace(b"\xa3\x00\x00\x00", b"\xa3\xed\xa0\x80")
    deep = _raw(_generate_body("deep", x=0))  # then the unknown field x: 0 -> [[[...nil...]]]
    deep[1] = deep[1].removesuffix(b"\x00") + b"\x91" * 5000 + b"\xc0"
    malformed = [
        [b"junk"],  # one frame
        [b""],
        [VERSION, b"\xc1\xc1 not msgpack"],
        [BAD_VERSION, *_encode(HealthRequest())[1:]],  # a health request, wrong version
        _raw({"type": "no_such_message"}),
        _raw(_generate_body(7)),  # req_id of the wrong type
        _raw(_generate_body("zero-tokens", sampling_params={"max_tokens": 0})),
        # Fits msgpack, not int64: it used to reach the sampler and fail the whole engine step.
        _raw(_generate_body("huge-top-k", sampling_params={"temperature": 1.0, "top_k": 2**63})),
        invalid_utf8,
        deep,  # ~5000 nested arrays in an unknown field
    ]
    text = prompt_text(arch, "What?", 1)
    bad_requests = {  # well-formed messages whose request cannot be served
        "bad-media": GenerateRequest(
            req_id="bad-media", prompt=text, images=[ImageBytesPart(b"not an image")]
        ),
        "no-messages": GenerateRequest(req_id="no-messages", messages=[]),
        "too-many-images": GenerateRequest(
            req_id="too-many-images",
            prompt=prompt_text(arch, "What?", 5),
            images=[ImageBytesPart(b"unread")] * 5,
        ),
        "too-long": GenerateRequest(req_id="too-long", prompt="hello world " * 3000),
    }
    expected_codes = {
        "bad-media": "invalid_media",
        "no-messages": "invalid_request",
        "too-many-images": "too_many_media_items",
        "too-long": "prompt_too_long",
    }
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    codec = MessageCodec(FrontendReply)
    wrong: list[object] = []
    try:
        sock.connect(address)
        for frames in malformed:
            sock.send_multipart(frames)
        for request in bad_requests.values():
            sock.send_multipart(_encode(request))
        sock.send_multipart(_encode(AbortRequest("never-sent")))  # no reply, no harm
        num_protocol_errors, answered = 0, set()
        while num_protocol_errors < len(malformed) or len(answered) < len(bad_requests):
            if not sock.poll(30_000):
                wrong.append(f"no reply after {num_protocol_errors} protocol errors, {answered}")
                break
            reply = codec.decode(sock.recv_multipart())
            if isinstance(reply, Ping):
                continue
            if isinstance(reply, RequestFailed) and reply.req_id == "":
                num_protocol_errors += 1
                if reply.error.code != "protocol_error":
                    wrong.append(reply)
            elif reply.req_id in bad_requests:  # type: ignore[union-attr]
                answered.add(reply.req_id)  # type: ignore[union-attr]
                code = expected_codes[reply.req_id]  # type: ignore[union-attr]
                if not isinstance(reply, RequestFailed) or reply.error.code != code:
                    wrong.append(reply)
            else:
                wrong.append(reply)
    finally:
        sock.close(linger=0)
        ctx.term()
    return wrong, len(malformed)


def gpu_input_faults(server: RunningServer) -> None:
    """Malformed messages to the GPU worker, on the frontend's own PUSH socket: the one channel
    the worker reads (a second PUSH could not connect to the frontend's bound PUSH). The caller
    checks that the worker still answers a stats request after them, on the same channel."""
    malformed = [
        [b"junk"],
        [VERSION, b"\xc1\xc1 not msgpack"],
        [BAD_VERSION, *_encode(StatsRequest(10**6))[1:]],
        _raw({"type": "add", "request": "not a request", "feature_epoch": 0}),
        _add_request("short-frame", drop_frame_bytes=4),
        _add_request("no-frame")[:2],  # the tensor's frame is missing
        _add_request("overflowing-empty-tensor", tensor=OVERFLOWING_EMPTY_TENSOR),
        _add_request("bad-dtype", tensor=["complex64", [4], -1, b"\0" * 32]),
        _add_request("short-inline", tensor=["float32", [4], -1, b"\0" * 15]),
        _add_request("negative-shape", tensor=["float32", [-1, 4], -1, b""]),
        _add_request("frame-out-of-range", tensor=["float32", [1, 3, 42, 42], 7, None]),
    ]

    async def send_all() -> None:
        for frames in malformed:
            await server.frontend.gpu_in.send_multipart(frames)

    server.call(send_all())


def gpu_output_faults(server: RunningServer, caplog: pytest.LogCaptureFixture) -> int:
    """Messages on the frontend's output channel from a second PUSH: malformed ones (some
    carrying tokens for the requests in flight), then valid ones for unknown requests. Returns
    the number of malformed ones, once the frontend has read them all."""

    async def engine_ids() -> list[str]:
        return list(server.frontend.requests)

    running = server.call(engine_ids())
    assert running, "the long request should be in flight"
    injected = StepOutputs([EngineOutput(req_id=r, new_token_ids=[0, 0, 0]) for r in running])
    wrong_type = {"type": "outputs", "outputs": [{"req_id": running[0], "new_token_ids": ["x"]}]}
    malformed = [
        [b"junk"],
        [VERSION, b"\xc1\xc1 not msgpack"],
        [BAD_VERSION, *_encode(injected)[1:]],  # real req ids, wrong version
        _raw(wrong_type),
        _raw({"type": "outputs"}),
    ]
    error = ErrorInfo("internal_error", "no such request", "no-such-request")
    unknown = [
        StepOutputs(
            [
                EngineOutput(
                    req_id="no-such-request", new_token_ids=[1, 2], finish_reason="length"
                ),
                EngineOutput(
                    req_id="no-such-request", new_token_ids=[], finish_reason="error", error=error
                ),
            ]
        ),
        WorkerStats(query_id=10**9, stats={}, feature_cache_keys=[]),
        WorkerReady(max_model_len=1, num_kv_blocks=1, device="cpu", dtype="float32"),
    ]
    before = log_count(caplog, SERVER_LOG, "malformed message from the GPU worker")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    try:
        sock.connect(server.frontend.ipc.gpu_output)
        for msg in unknown:
            sock.send_multipart(_encode(msg))
        for frames in malformed:  # last: once they are logged, everything was read (one peer)
            sock.send_multipart(frames)
        wait_for(
            lambda: (
                log_count(caplog, SERVER_LOG, "malformed message from the GPU worker")
                == before + len(malformed)
            ),
            "the frontend to drop the malformed outputs",
            timeout_s=30,
        )
    finally:
        sock.close(linger=0)
        ctx.term()
    return len(malformed)


def preprocess_faults(server: RunningServer, caplog: pytest.LogCaptureFixture) -> int:
    """Messages on the preprocess ROUTER from a DEALER that is no worker: malformed ones, a
    second Ready for a real worker's pid, and results/failures for every job id so far (the
    jobs of the requests in flight included), which must all be dropped as stale. Returns the
    number of malformed ones, once the pool has read them all."""
    worker_pid = next(iter(in_flight(server)))
    tensors = {"pixel_values": torch.zeros(1, 3, 42, 42)}
    malformed = [
        [b"junk"],
        [VERSION, b"\xc1\xc1 not msgpack"],
        [BAD_VERSION, *_encode(PreprocessReady(worker_pid))[1:]],
        _raw({"type": "result", "job_id": "x"}),
        _raw(
            {
                "type": "result",
                "job_id": 10**9,
                "tensors": {"pixel_values": OVERFLOWING_EMPTY_TENSOR},
                "num_tokens": 9,
                "seconds": 0.0,
            }
        ),
        _encode(PreprocessResult(job_id=10**9 + 1, tensors=tensors, num_tokens=9, seconds=0.0))[
            :2
        ],  # its tensor frame is missing
    ]
    fakes: list[msgspec.Struct] = [PreprocessReady(worker_pid)]
    for job_id in range(300):
        fakes.append(PreprocessResult(job_id=job_id, tensors=tensors, num_tokens=9, seconds=0.0))
        fakes.append(PreprocessFailed(job_id, ErrorInfo("invalid_media", "fake", "")))
    before = log_count(caplog, POOL_LOG, "malformed message from a preprocess worker")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(server.frontend.ipc.preprocess)
        for msg in fakes:
            sock.send_multipart(_encode(msg))
        for frames in malformed:
            sock.send_multipart(frames)
        wait_for(
            lambda: (
                log_count(caplog, POOL_LOG, "malformed message from a preprocess worker")
                == before + len(malformed)
            ),
            "the preprocess pool to drop the malformed replies",
            timeout_s=30,
        )
    finally:
        sock.close(linger=0)
        ctx.term()
    return len(malformed)


def test_malformed_messages_on_every_socket(
    served: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    arch, server = served
    caplog.set_level(logging.WARNING)
    long_text = prompt_text(arch, "Tell me a long story about this picture.", 1)
    long_image = png(random_image(64, 48, seed=31), 1)
    others = [  # concurrent image requests, preprocessed while fake preprocess replies arrive
        (prompt_text(arch, f"Question {i}?", 1), two_encodings(random_image(400, 300, seed=40 + i)))
        for i in range(4)
    ]

    async def run_long(client: AsyncClient) -> list[int]:
        ids: list[int] = []
        async for delta in client.stream(long_text, [long_image], LONG):
            ids += delta.token_ids
        return ids

    async def undisturbed() -> tuple[list[int], list[list[int]]]:
        async with AsyncClient(server.address, timeout_s=120) as client:
            long_ids = await run_long(client)
            outs = [await client.generate(t, [ims[0]], GREEDY) for t, ims in others]
        return long_ids, [o.token_ids for o in outs]

    expected_long, expected_others = asyncio.run(undisturbed())
    assert len(expected_long) == LONG.max_tokens
    stats_before = server.stats()
    pids_before = set(in_flight(server))

    def inject_all() -> tuple[list[object], int, int, int]:
        wrong_sdk, num_sdk = sdk_faults(server.address, arch)
        gpu_input_faults(server)
        num_pre = preprocess_faults(server, caplog)
        num_out = gpu_output_faults(server, caplog)
        return wrong_sdk, num_sdk, num_pre, num_out

    async def disturbed() -> list[object]:
        """The long request, the others and the faults, all at once; exceptions as values."""
        async with AsyncClient(server.address, timeout_s=120) as client:
            running = asyncio.Event()

            async def long_request() -> list[int]:
                ids: list[int] = []
                try:
                    async for delta in client.stream(long_text, [long_image], LONG):
                        ids += delta.token_ids
                        running.set()
                finally:
                    running.set()
                return ids

            async def faults_while_running() -> tuple:
                await running.wait()
                faults = await asyncio.to_thread(inject_all)
                return faults, not long_task.done()

            long_task = asyncio.ensure_future(long_request())
            other_tasks = [client.generate(t, [ims[1]], GREEDY) for t, ims in others]
            return await asyncio.gather(
                long_task, faults_while_running(), *other_tasks, return_exceptions=True
            )

    results = asyncio.run(disturbed())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    long_ids, (faults, overlapped), *other_outs = results
    other_ids = [o.token_ids for o in other_outs]
    wrong_sdk, num_sdk, num_pre, num_out = faults
    assert overlapped, "the long request finished before the faults did: raise LONG.max_tokens"
    assert wrong_sdk == []
    assert long_ids == expected_long
    assert other_ids == expected_others

    # Every malformed message was logged by the frontend (its loggers run in this process).
    assert log_count(caplog, SERVER_LOG, "dropped a malformed SDK message") == num_sdk
    assert log_count(caplog, SERVER_LOG, "malformed message from the GPU worker") == num_out
    assert log_count(caplog, POOL_LOG, "malformed message from a preprocess worker") == num_pre
    assert log_count(caplog, POOL_LOG, "said ready twice") == 1
    assert not [r.getMessage() for r in caplog.records if r.exc_info or "died" in r.getMessage()]

    # No process died or was replaced, and the GPU worker still reads its input: its stats
    # answer on the same channel, after the malformed messages (read in order).
    assert server.frontend.gpu_process.is_alive()
    stats = server.stats()
    assert stats["gpu_worker_pid"] == stats_before["gpu_worker_pid"]
    assert set(in_flight(server)) == pids_before
    assert stats["preprocess_workers_replaced"] == stats_before["preprocess_workers_replaced"]
    assert stats["preprocess_workers_ready"] == NUM_WORKERS
    # The one preprocessing job that failed is bad-media's ("not an image").
    assert stats["preprocess_jobs_failed"] == stats_before["preprocess_jobs_failed"] + 1
    assert stats["frontend_requests_in_flight"] == 0 and stats["mm_runtime_requests_running"] == 0
    assert stats["kv_num_free_blocks"] == stats_before["kv_num_free_blocks"]
    # None of the malformed AddRequests reached the GPU worker's feature cache.
    _, _, gpu_keys = server.call(server.frontend.stats())
    assert gpu_keys == list(server.frontend.mirror.lru.keys())
    assert not any(k.startswith("fault-") for k in gpu_keys)

    # Afterwards, normal requests succeed.
    text = prompt_text(arch, "And now?", 1)
    with Client(server.address, timeout_s=120) as client:
        out = client.generate(text, [png(random_image(90, 70, seed=50), 1)], GREEDY)
        again = client.generate(others[0][0], [others[0][1][0]], GREEDY)
        assert client.health()["preprocess_workers_ready"] == NUM_WORKERS
    assert len(out.token_ids) == 16 and again.token_ids == expected_others[0]
