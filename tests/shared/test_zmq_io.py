"""MessageCodec: every message of every socket round-trips bit-exactly, tensors arrive without a
copy (in-process and over real ZMQ sockets), and malformed input raises ProtocolError only.

The fuzz tests feed random frames and mutated valid encodings: decoding either returns a message
of the socket's union (one that encodes again) or raises ProtocolError, never anything else,
because each process decodes input from others and must survive a bad message (DESIGN.md 4).
"""

import typing

import msgspec
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mm_runtime.shared.errors import ProtocolError
from mm_runtime.shared.wire import (
    PROTOCOL_VERSION,
    AbortRequest,
    AbortRequests,
    AddRequest,
    ChatMessage,
    ClientMessage,
    EngineOutput,
    EngineRequest,
    ErrorInfo,
    FeatureCacheReset,
    FrontendReply,
    GenerateRequest,
    GpuWorkerInput,
    GpuWorkerOutput,
    HealthReply,
    HealthRequest,
    ImageBytesPart,
    ImageURL,
    ImageURLPart,
    Logprob,
    MMItem,
    Ping,
    PlaceholderRange,
    PreprocessFailed,
    PreprocessJob,
    PreprocessReady,
    PreprocessReply,
    PreprocessResult,
    RequestDelta,
    RequestFailed,
    SamplingParams,
    Shutdown,
    StatsRequest,
    StepOutputs,
    TextPart,
    TokenLogprobs,
    Usage,
    WorkerReady,
    WorkerStats,
)
from mm_runtime.shared.zmq_io import INLINE_TENSOR_BYTES, IpcPaths, MessageCodec, send

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
# What each socket decodes: a union of tagged structs, or one struct (frontend -> preprocess).
UNIONS = {
    "ClientMessage": ClientMessage,
    "FrontendReply": FrontendReply,
    "GpuWorkerInput": GpuWorkerInput,
    "GpuWorkerOutput": GpuWorkerOutput,
    "PreprocessJob": PreprocessJob,
    "PreprocessReply": PreprocessReply,
}


def members(union: typing.Any) -> tuple[type, ...]:
    return typing.get_args(union) or (union,)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaNs and infinities included for floats), 0/1 for bool."""
    gen = torch.Generator().manual_seed(seed)
    numel = int(np.prod(shape, dtype=np.int64))
    item_bytes = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * item_bytes,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw %= 2
    return raw.view(dtype).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a: object, b: object, path: str = "$") -> None:
    """Deep equality, tensors compared bit for bit (dtype, shape, bytes)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert tensor_bytes(a) == tensor_bytes(b), path
    elif isinstance(a, msgspec.Struct):
        assert type(a) is type(b), path
        for name in a.__struct_fields__:
            assert_same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def iter_tensors(obj: object) -> typing.Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, msgspec.Struct):
        for name in obj.__struct_fields__:
            yield from iter_tensors(getattr(obj, name))
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from iter_tensors(value)


def buffer_span(frame: object) -> tuple[int, int]:
    buf = frame.buffer if isinstance(frame, zmq.Frame) else frame
    arr = np.frombuffer(buf, dtype=np.uint8)
    return arr.ctypes.data, arr.ctypes.data + arr.nbytes


def assert_no_copy(msg: object, frames: list) -> None:
    """Every out-of-band tensor lies inside one of the message's tensor frames."""
    spans = [buffer_span(f) for f in frames[2:]]
    big = [t for t in iter_tensors(msg) if t.nbytes > INLINE_TENSOR_BYTES]
    assert len(big) == len(spans)
    for t in big:
        start, end = t.data_ptr(), t.data_ptr() + t.nbytes
        assert any(lo <= start and end <= hi for lo, hi in spans), "tensor was copied"


def pixel_item(mm_hash: str, seed: int) -> MMItem:
    tensors = {
        "pixel_values": random_tensor(torch.float32, (16, 1176), seed),  # [patches, C*T*P*P]
        "image_grid_thw": torch.tensor([[1, 4, 4]]),  # inline: 24 bytes
    }
    return MMItem(
        modality="image", mm_hash=mm_hash, placeholder=PlaceholderRange(3, 4), tensors=tensors
    )


def sample_messages() -> dict[type, list[msgspec.Struct]]:
    """At least one constructed instance of every message type, optional fields set."""
    params = SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, seed=3, stop=["\n"], logprobs=2
    )
    logprobs = [TokenLogprobs(Logprob(5, -0.25), [Logprob(5, -0.25), Logprob(9, -2.5)])]
    error = ErrorInfo("feature_cache_miss", "retry", "r1")
    hit = MMItem(modality="image", mm_hash="ab" * 32, placeholder=PlaceholderRange(20, 4))
    msgs: list[msgspec.Struct] = [
        GenerateRequest(
            req_id="r1",
            prompt="USER: <image> hi",
            images=[ImageBytesPart(b"\x89PNG"), ImageURLPart(ImageURL("data:x"))],
        ),
        GenerateRequest(
            req_id="r2",
            messages=[
                ChatMessage("system", "be brief"),
                ChatMessage(
                    "user",
                    [
                        TextPart("what?"),
                        ImageURLPart(ImageURL("data:image/png;base64,AAAA")),
                        ImageBytesPart(b"\xff\xd8\xff"),
                    ],
                ),
            ],
            sampling_params=params,
            stream=True,
        ),
        AbortRequest("r1"),
        HealthRequest(),
        RequestDelta(req_id="r1", text="hi", token_ids=[1, 2]),
        RequestDelta(
            req_id="r1",
            text="",
            token_ids=[3],
            logprobs=logprobs,
            finish_reason="length",
            usage=Usage(12, 3),
        ),
        RequestFailed("r1", error),
        HealthReply(ok=True, stats={"mm_runtime_num_requests_running": 2.0}),
        Ping(),
        AddRequest(
            request=EngineRequest(
                req_id="r1",
                prompt_token_ids=list(range(30)),
                sampling_params=params,
                mm_items=[pixel_item("cd" * 32, 1), hit],
            ),
            feature_epoch=2,
        ),
        AddRequest(
            request=EngineRequest(
                req_id="r2", prompt_token_ids=[1], sampling_params=SamplingParams()
            ),
            feature_epoch=0,
        ),
        AbortRequests(["r1", "r2"]),
        StatsRequest(7),
        Shutdown(),
        WorkerReady(max_model_len=4096, num_kv_blocks=100, device="cpu", dtype="float32"),
        StepOutputs(
            [
                EngineOutput(req_id="r1", new_token_ids=[4]),
                EngineOutput(
                    req_id="r2",
                    new_token_ids=[5, 6],
                    new_logprobs=logprobs * 2,
                    finish_reason="error",
                    error=error,
                ),
            ]
        ),
        FeatureCacheReset(3),
        WorkerStats(query_id=7, stats={"x": 1.5}, feature_cache_keys=["ab" * 32]),
        PreprocessJob(1, "image", b"\x89PNG\r\n"),
        PreprocessResult(
            job_id=1, tensors=pixel_item("ef" * 32, 2).tensors, num_tokens=4, seconds=0.01
        ),
        PreprocessFailed(1, ErrorInfo("invalid_media", "cannot decode", "")),
        PreprocessReady(1234),
    ]
    out: dict[type, list[msgspec.Struct]] = {}
    for msg in msgs:
        out.setdefault(type(msg), []).append(msg)
    return out


SAMPLES = sample_messages()
CASES = [
    pytest.param(union, msg, id=f"{name}-{type(msg).__name__}{i}")
    for name, union in UNIONS.items()
    for cls in members(union)
    for i, msg in enumerate(SAMPLES.get(cls, []))
]


def roundtrip(union: typing.Any, msg: msgspec.Struct) -> tuple[msgspec.Struct, list]:
    frames = MessageCodec().encode(msg)
    return MessageCodec(union).decode(frames), frames


def test_every_message_type_has_a_sample() -> None:
    all_members = {cls for union in UNIONS.values() for cls in members(union)}
    assert all_members == set(SAMPLES)


@pytest.mark.parametrize(("union", "msg"), CASES)
def test_roundtrip_every_message(union: typing.Any, msg: msgspec.Struct) -> None:
    decoded, frames = roundtrip(union, msg)
    assert_same(msg, decoded)
    assert bytes(frames[0]) == bytes([PROTOCOL_VERSION])
    assert_no_copy(decoded, frames)


def result_with(tensors: dict[str, torch.Tensor]) -> PreprocessResult:
    return PreprocessResult(job_id=1, tensors=tensors, num_tokens=1, seconds=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_dtypes_roundtrip_bit_exact(dtype: torch.dtype) -> None:
    limit = INLINE_TENSOR_BYTES // torch.empty((), dtype=dtype).element_size()
    tensors = {
        "scalar": random_tensor(dtype, (), 1),
        "empty": random_tensor(dtype, (0, 3), 2),
        "empty_1d": random_tensor(dtype, (0,), 3),
        "small": random_tensor(dtype, (3, 5), 4),  # inline
        "at_limit": random_tensor(dtype, (limit,), 5),  # exactly INLINE_TENSOR_BYTES: inline
        "over_limit": random_tensor(dtype, (limit + 1,), 6),  # out of band from here
        "large": random_tensor(dtype, (64, 33), 7),
        "large_3d": random_tensor(dtype, (3, 100, 7), 8),
    }
    msg = result_with(tensors)
    decoded, frames = roundtrip(PreprocessReply, msg)
    assert_same(msg, decoded)
    assert len(frames) == 2 + 3  # over_limit, large and large_3d travel out of band
    assert_no_copy(decoded, frames)


def test_non_contiguous_inputs() -> None:
    base = random_tensor(torch.float32, (40, 60), 1)
    tensors = {
        "transposed": base.t(),
        "strided": base[::2, ::3],
        "offset": base[5:, 7:],
        "expanded": torch.arange(50.0).expand(30, 50),  # stride 0
        "small_transposed": random_tensor(torch.bfloat16, (4, 6), 2).t(),
        "bool_strided": random_tensor(torch.bool, (64, 64), 3)[:, ::2],
    }
    before = {k: tensor_bytes(v) for k, v in tensors.items()}
    msg = result_with(dict(tensors))
    decoded, frames = roundtrip(PreprocessReply, msg)
    assert_same(msg, decoded)
    assert_no_copy(decoded, frames)
    assert all(decoded.tensors[k].is_contiguous() for k in tensors)
    assert {k: tensor_bytes(v) for k, v in tensors.items()} == before  # inputs untouched


def test_encode_is_zero_copy_for_contiguous_cpu_tensors() -> None:
    t = random_tensor(torch.float32, (256, 256))
    frames = MessageCodec().encode(result_with({"x": t}))
    assert buffer_span(frames[2]) == (t.data_ptr(), t.data_ptr() + t.nbytes)


def test_tensors_survive_the_frames_list() -> None:
    """The decoded tensor keeps its frame alive: dropping the frames does not free the bytes."""
    t = random_tensor(torch.int32, (1000,))
    frames = [bytes(f) for f in MessageCodec().encode(result_with({"x": t}))]
    decoded = MessageCodec(PreprocessReply).decode(frames)
    del frames
    assert torch.equal(decoded.tensors["x"], t)


# ---- over real sockets -------------------------------------------------------------------------


@pytest.fixture
def push_pull() -> typing.Iterator[tuple[zmq.Socket, zmq.Socket]]:
    paths = IpcPaths.create()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(paths.address("test"))
    push = ctx.socket(zmq.PUSH)
    push.connect(paths.address("test"))
    pull.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        yield push, pull
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
        paths.remove()


def test_over_zmq_ipc_every_message(push_pull: tuple[zmq.Socket, zmq.Socket]) -> None:
    push, pull = push_pull
    encoder = MessageCodec()
    for union, msg in ((c.values[0], c.values[1]) for c in CASES):
        send(push, encoder, msg)
        frames = pull.recv_multipart(copy=False)
        decoded = MessageCodec(union).decode(frames)
        assert_same(msg, decoded)
        assert_no_copy(decoded, frames)


@pytest.mark.parametrize("num_bytes", [1500, 8 * 1024, 4 * 1024 * 1024])
def test_over_zmq_ipc_large_tensors_share_the_frame(
    push_pull: tuple[zmq.Socket, zmq.Socket], num_bytes: int
) -> None:
    push, pull = push_pull
    msg = result_with(
        {
            "pixel_values": random_tensor(torch.float32, (num_bytes // 4,), 1),
            "bf16": random_tensor(torch.bfloat16, (num_bytes // 2,), 2).view(2, -1).t(),
            "grid": torch.tensor([[1, 2, 2]]),
        }
    )
    send(push, MessageCodec(), msg)
    frames = pull.recv_multipart(copy=False)
    assert all(isinstance(f, zmq.Frame) for f in frames)
    decoded = MessageCodec(PreprocessReply).decode(frames)
    assert_same(msg, decoded)
    assert_no_copy(decoded, frames)
    del frames  # the tensors hold their frames
    assert_same(msg, decoded)


# ---- malformed input ---------------------------------------------------------------------------


def raw_body(frames: list) -> typing.Any:
    return msgspec.msgpack.decode(bytes(frames[1]))


def with_body(frames: list, body: typing.Any) -> list:
    return [frames[0], msgspec.msgpack.encode(body), *frames[2:]]


def tensor_result_frames() -> list:
    """PreprocessResult with an out-of-band "big" tensor and an inline "small" one."""
    tensors = {
        "big": random_tensor(torch.float32, (512,), 1),
        "small": random_tensor(torch.int64, (1, 3), 2),
    }
    return [bytes(f) for f in MessageCodec().encode(result_with(tensors))]


def with_ref(field: int, value: object, tensor: str = "big") -> list:
    frames = tensor_result_frames()
    body = raw_body(frames)
    body["tensors"][tensor][field] = value
    return with_body(frames, body)


def deep_nesting(depth: int) -> bytes:
    """A valid PreprocessReady map plus an unknown field nested `depth` arrays deep."""
    enc = msgspec.msgpack.encode
    return (
        b"\x83"
        + enc("type")
        + enc("ready")
        + enc("pid")
        + enc(1)
        + enc("x")
        + (b"\x91" * depth + b"\xc0")
    )


_GOOD = tensor_result_frames()
MALFORMED = {
    "no_frames": [],
    "only_version": [bytes([PROTOCOL_VERSION])],
    "garbage_body": [bytes([PROTOCOL_VERSION]), b"\x00garbage\xff\xfe"],
    "empty_body": [bytes([PROTOCOL_VERSION]), b""],
    "truncated_body": [_GOOD[0], _GOOD[1][:-3], *_GOOD[2:]],
    "wrong_version": [bytes([PROTOCOL_VERSION + 1]), *_GOOD[1:]],
    "empty_version": [b"", *_GOOD[1:]],
    "long_version": [bytes([PROTOCOL_VERSION, 0]), *_GOOD[1:]],
    "invalid_utf8_tag": [_GOOD[0], _GOOD[1].replace(b"result", b"\x80esult"), *_GOOD[2:]],
    "invalid_utf8_string": [_GOOD[0], _GOOD[1].replace(b"float32", b"\xfeloat32"), *_GOOD[2:]],
    "body_not_a_map": [bytes([PROTOCOL_VERSION]), msgspec.msgpack.encode([1, 2])],
    "unknown_tag": with_body(_GOOD, {**raw_body(_GOOD), "type": "nope"}),
    "wrong_union": MessageCodec().encode(FeatureCacheReset(1)),
    "wrong_union_same_tag": MessageCodec().encode(RequestFailed("r", ErrorInfo("c", "m", "r"))),
    "missing_field": with_body(_GOOD, {"type": "result", "job_id": 1}),
    "wrong_field_type": with_body(_GOOD, {**raw_body(_GOOD), "num_tokens": "four"}),
    "tensor_frame_short": [*_GOOD[:2], _GOOD[2][:-1]],
    "tensor_frame_long": [*_GOOD[:2], _GOOD[2] + b"\x00"],
    "tensor_frame_missing": _GOOD[:2],
    "tensor_frame_index_out_of_range": with_ref(2, 1),
    "tensor_frame_index_negative": with_ref(2, -2),
    "inline_data_missing": with_ref(3, None, "small"),
    "inline_data_wrong_length": with_ref(3, b"\x00" * 23, "small"),
    "negative_shape": with_ref(1, [-512]),
    "negative_shape_balanced": with_ref(1, [-1, -512]),  # product matches the frame
    "shape_not_ints": with_ref(1, [512.0]),
    "shape_overflows_int64": with_ref(1, [2**64 - 1, 0]),  # numel 0, so only torch can object
    "unknown_dtype": with_ref(0, "complex64"),
    "dtype_with_prefix": with_ref(0, "torch.float32"),
    "tensor_ref_as_map": with_body(
        _GOOD, {**raw_body(_GOOD), "tensors": {"big": {"dtype": "float32"}}}
    ),
    "tensor_ref_too_short": with_body(_GOOD, {**raw_body(_GOOD), "tensors": {"big": ["uint8"]}}),
    "deep_nesting": [bytes([PROTOCOL_VERSION]), deep_nesting(100_000)],
}


@pytest.mark.parametrize("frames", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_raises_protocol_error(frames: list) -> None:
    with pytest.raises(ProtocolError):
        MessageCodec(PreprocessReply).decode(frames)


def test_struct_validation_failure_is_a_protocol_error() -> None:
    """SamplingParams refuses max_tokens 0 in __post_init__ (InvalidRequest); on a socket that
    is a malformed message from a client that skipped the SDK's own check."""
    body = {"type": "generate", "req_id": "r1", "prompt": "x", "sampling_params": {"max_tokens": 0}}
    with pytest.raises(ProtocolError):
        MessageCodec(ClientMessage).decode(
            [bytes([PROTOCOL_VERSION]), msgspec.msgpack.encode(body)]
        )


def test_every_message_of_another_union_is_refused() -> None:
    """A struct sent on the wrong socket never decodes as a message of that socket, even where
    tags coincide (abort, failed, ready): the required fields differ."""
    for name, union in UNIONS.items():
        own = set(members(union))
        codec = MessageCodec(union)
        for cls, msgs in SAMPLES.items():
            if cls in own:
                continue
            for msg in msgs:
                try:
                    codec.decode(MessageCodec().encode(msg))
                except ProtocolError:
                    continue
                pytest.fail(f"{type(msg).__name__} decoded as {name}")


def test_decoder_is_reusable_after_an_error() -> None:
    codec = MessageCodec(PreprocessReply)
    with pytest.raises(ProtocolError):
        codec.decode(MALFORMED["tensor_frame_missing"])
    decoded = codec.decode(_GOOD)
    assert decoded.tensors["big"].shape == (512,)


# ---- fuzz --------------------------------------------------------------------------------------

FUZZ_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
ALL_SAMPLES = [c.values[1] for c in CASES]
ENCODED = [[bytes(f) for f in MessageCodec().encode(m)] for m in ALL_SAMPLES]


def check_decode(union: typing.Any, frames: list) -> None:
    """Either a message of the union (which encodes again) or ProtocolError; nothing else."""
    try:
        msg = MessageCodec(union).decode(frames)
    except ProtocolError:
        return
    assert isinstance(msg, members(union))
    MessageCodec().encode(msg)


unions = st.sampled_from(list(UNIONS.values()))
version_frames = st.one_of(st.just(bytes([PROTOCOL_VERSION])), st.binary(max_size=3))


@FUZZ_SETTINGS
@given(union=unions, version=version_frames, rest=st.lists(st.binary(max_size=64), max_size=4))
def test_fuzz_random_frames(union: typing.Any, version: bytes, rest: list[bytes]) -> None:
    check_decode(union, [version, *rest])


@st.composite
def byte_mutations(draw: st.DrawFn) -> list:
    frames = list(draw(st.sampled_from(ENCODED)))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(frames) - 1))
        frame = bytearray(frames[i])
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "drop", "duplicate"]))
        if kind == "flip" and frame:
            pos = draw(st.integers(0, len(frame) - 1))
            frame[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            frame = frame[: draw(st.integers(0, len(frame)))]
        elif kind == "insert":
            pos = draw(st.integers(0, len(frame)))
            frame[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "drop" and len(frames) > 1:
            del frames[i]
            continue
        elif kind == "duplicate":
            frames.insert(i, bytes(frame))
        frames[i] = bytes(frame)
    return frames


@FUZZ_SETTINGS
@given(union=unions, frames=byte_mutations())
def test_fuzz_byte_mutations_of_valid_messages(union: typing.Any, frames: list) -> None:
    check_decode(union, frames)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(["float32", "bool", "bfloat16", "add", "result", "image", "abort"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


def _paths(node: typing.Any, prefix: tuple = ()) -> typing.Iterator[tuple]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


@st.composite
def structural_mutations(draw: st.DrawFn) -> list:
    """Replaces one node of a valid body (a field, a shape dim, a frame index...) by any value."""
    frames = list(draw(st.sampled_from(ENCODED)))
    body = raw_body(frames)
    path = draw(st.sampled_from(list(_paths(body))))
    value = draw(msgpack_values)
    if not path:
        body = value
    else:
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
    return with_body(frames, body)


@FUZZ_SETTINGS
@given(union=unions, frames=structural_mutations())
def test_fuzz_structural_mutations_of_valid_messages(union: typing.Any, frames: list) -> None:
    check_decode(union, frames)
