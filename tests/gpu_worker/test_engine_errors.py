"""Bad input fails its own request with a clear error, and the engine keeps serving the others.

Acceptance 6: a prompt over `max_model_len`, more or fewer image placeholders than images, a
corrupt image, a 0x0 image and an unknown architecture each raise an `MMRuntimeError` subclass
with a stable `code` and a message naming the problem. Every bad input here arrives while good
requests are mid-flight (some still in chunked prefill) in the same engine; they must finish
with exactly the tokens they give alone, and the bad request must leave nothing behind.
"""

import base64
import io
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
import torch
from mm_testing import ARCHS, handmade_png, hf_greedy, mm_prompt, prompt_text, random_image
from PIL import Image

from mm_runtime import LLM, MMRuntimeError, SamplingParams
from mm_runtime.shared.errors import ConfigError, InvalidRequest, MediaError
from mm_runtime.shared.wire import EngineRequest, PlaceholderRange

MAX_MODEL_LEN = 128
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
QUESTION = "What is in this image?"

# Good requests kept in flight around each bad input: text only, one image, two images.
GOOD_CASES = [
    ("Describe the weather today.", []),
    ("What is in this image?", [(48, 40)]),
    ("Compare the two pictures.", [(30, 30), (20, 60)]),
]


# ---- bad media, as bytes ----


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


GOOD_PNG = png_bytes(random_image(64, 64, seed=1))
TRUNCATED_PNG = GOOD_PNG[: len(GOOD_PNG) // 2]
CORRUPT_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # PNG signature, then garbage


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# ---- the engine under test and the good requests around each bad input ----


@dataclass
class Served:
    """One engine per architecture, and what each good request gives when run alone."""

    arch: str
    llm: LLM
    good: list[dict[str, object]]
    expected: list[list[int]] = field(default_factory=list)


@pytest.fixture(scope="module", params=ARCHS)
def served(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Served:
    arch = request.param
    # A small token budget chunks every prefill, so bad input also lands mid-prefill; without
    # prefix caching the good requests recompute their prompts each time instead of hitting.
    llm = LLM(
        tiny_models[arch],
        device="cpu",
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=16,
        num_kv_blocks=64,
        enable_prefix_caching=False,
    )
    good = []
    for i, (question, sizes) in enumerate(GOOD_CASES):
        images = [random_image(w, h, seed=20 + 2 * i + j) for j, (w, h) in enumerate(sizes)]
        good.append(mm_prompt(prompt_text(arch, question, len(images)), images))
    s = Served(arch, llm, good)
    s.expected = [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in good]
    return s


@pytest.fixture
def engine_idle_after(served: Served) -> Iterator[Served]:
    """Leaves the shared engine empty even when a test fails halfway."""
    yield served
    for req_id in list(served.llm.engine.requests):
        served.llm.engine.abort_request(req_id)


class InFlight:
    """Good requests started in the engine and stepped a few times, finished on demand."""

    def __init__(self, served: Served, num_steps: int = 3) -> None:
        self.served = served
        self.engine = served.llm.engine
        assert not self.engine.has_unfinished_requests()
        self.tokens: dict[str, list[int]] = {}  # req_id -> tokens so far
        self.expected: dict[str, list[int]] = {}  # req_id -> tokens it gives alone
        for i in range(len(served.good)):
            self.add(f"good-{i}", i)
        for _ in range(num_steps):
            self.step()
        assert any(r.is_prefill for r in self.engine.requests.values()), "none mid-prefill"

    @property
    def req_ids(self) -> list[str]:
        return list(self.tokens)

    def add(self, req_id: str, good_index: int) -> None:
        req = self.served.llm.build_request(self.served.good[good_index], GREEDY, req_id=req_id)
        self.engine.add_request(req)
        self.tokens[req_id] = []
        self.expected[req_id] = self.served.expected[good_index]

    def step(self) -> None:
        for out in self.engine.step():
            assert out.error is None, out.error
            self.tokens[out.req_id].extend(out.new_token_ids)

    def finish_and_check(self) -> None:
        num_steps = 0
        while self.engine.has_unfinished_requests():
            self.step()
            num_steps += 1
            assert num_steps < 1_000
        assert self.tokens == self.expected
        kv = self.engine.kv
        assert kv.num_free_blocks == kv.num_blocks - 1, "a KV block leaked"
        assert not self.engine.scheduler.has_unfinished()


# ---- the bad inputs ----

Submit = Callable[[Served, InFlight], object]


@dataclass(frozen=True)
class BadInput:
    name: str
    submit: Submit  # must raise
    error: type[MMRuntimeError]
    code: str
    match: str  # regex the message must contain
    archs: tuple[str, ...] = tuple(ARCHS)


def generate_with_image(image: object, num_placeholders: int = 1) -> Submit:
    def submit(s: Served, _: InFlight) -> object:
        prompt = mm_prompt(prompt_text(s.arch, QUESTION, num_placeholders), [image])
        return s.llm.generate(prompt, GREEDY, use_tqdm=False)

    return submit


def generate_with_counts(num_placeholders: int, num_images: int) -> Submit:
    def submit(s: Served, _: InFlight) -> object:
        images = [random_image(32, 32, seed=i) for i in range(num_images)]
        prompt = mm_prompt(prompt_text(s.arch, QUESTION, num_placeholders), images)
        return s.llm.generate(prompt, GREEDY, use_tqdm=False)

    return submit


def generate_with_params(**kwargs: object) -> Submit:
    def submit(s: Served, _: InFlight) -> object:
        return s.llm.generate("hi", SamplingParams(**kwargs), use_tqdm=False)

    return submit


def add_by_hand(token_ids: Callable[[Served], list[int]], req_id: str = "bad") -> Submit:
    def submit(s: Served, _: InFlight) -> object:
        req = EngineRequest(req_id=req_id, prompt_token_ids=token_ids(s), sampling_params=GREEDY)
        return s.llm.engine.add_request(req)

    return submit


def add_tampered(edit: Callable[[EngineRequest], None], num_images: int = 1) -> Submit:
    """A well-formed image request whose items are then broken by `edit` before it is added."""

    def submit(s: Served, _: InFlight) -> object:
        images = [random_image(40, 40, seed=7 + i) for i in range(num_images)]
        prompt = mm_prompt(prompt_text(s.arch, QUESTION, num_images), images)
        req = s.llm.build_request(prompt, GREEDY, req_id="tampered")
        edit(req)
        return s.llm.engine.add_request(req)

    return submit


def submit_media_over_limit(s: Served, _: InFlight) -> object:
    """A prompt whose text fits max_model_len but whose image tokens push it over."""
    image = random_image(40, 40, seed=3)
    num_image_tokens = s.llm.image_processor(image).num_tokens
    question = ""
    while True:
        text = prompt_text(s.arch, question, 1)
        num_tokens = len(s.llm.prompts.tokenize(text, [num_image_tokens])[0])
        if num_tokens >= MAX_MODEL_LEN:
            break
        question += " dog"
    assert num_tokens - num_image_tokens < MAX_MODEL_LEN  # the text alone would fit
    req = s.llm.build_request(mm_prompt(text, [image]), GREEDY, req_id="bad")
    return s.llm.engine.add_request(req)


def submit_duplicate_req_id(s: Served, _: InFlight) -> object:
    running_id = next(iter(s.llm.engine.requests))
    req = s.llm.build_request("hi", GREEDY, req_id=running_id)
    return s.llm.engine.add_request(req)


def vocab_size(s: Served) -> int:
    return s.llm.engine.runner.model.config.get_text_config().vocab_size


def shrink_pixel_values(req: EngineRequest) -> None:
    tensors = req.mm_items[0].tensors  # LLaVA [1, C, H, W]; Qwen2-VL [1, H, W, C]
    tensors["pixel_values"] = tensors["pixel_values"][..., :28, :28].contiguous()


def drop_pixel_values(req: EngineRequest) -> None:
    del req.mm_items[0].tensors["pixel_values"]


def shorten_placeholder(req: EngineRequest) -> None:
    p = req.mm_items[0].placeholder
    req.mm_items[0].placeholder = PlaceholderRange(p.offset, p.length - 1)


def move_placeholder_past_end(req: EngineRequest) -> None:
    p = req.mm_items[0].placeholder
    req.mm_items[0].placeholder = PlaceholderRange(len(req.prompt_token_ids) - 2, p.length)


def overlap_placeholders(req: EngineRequest) -> None:
    req.mm_items[1].placeholder = req.mm_items[0].placeholder


def unmergeable_grid(req: EngineRequest) -> None:
    """Qwen2-VL: an odd grid width cannot be 2x2-merged, even with pixels of matching size."""
    tensors = req.mm_items[0].tensors
    t, h, _ = (int(x) for x in tensors["image_grid_thw"][0])
    tensors["image_grid_thw"] = torch.tensor([[t, h, 3]])
    tensors["pixel_values"] = tensors["pixel_values"][..., : 3 * 14].contiguous()


def crop_unresized_image(req: EngineRequest) -> None:
    """Qwen2-VL: half the decoded image with the whole one's grid (40 x 20 resizes to 84 x 56,
    not to the 56 x 56 of the grid)."""
    tensors = req.mm_items[0].tensors  # pixel_values: uint8 [1, height, width, channels]
    tensors["pixel_values"] = tensors["pixel_values"][:, :, :20].contiguous()


def unresized_image_above_max_pixels(req: EngineRequest) -> None:
    """Qwen2-VL: an image over max_pixels (the tiny model's 224 x 224) sent unresized with the
    grid it resizes to (smart_resize: 300 x 250 -> 224 x 196); the preprocess worker resizes
    such images itself, so the GPU worker never resizes more pixels than max_pixels."""
    tensors = req.mm_items[0].tensors
    tensors["pixel_values"] = torch.zeros(1, 300, 250, 3, dtype=torch.uint8)
    tensors["image_grid_thw"] = torch.tensor([[1, 16, 14]])


def float_pixel_values(req: EngineRequest) -> None:
    """Normalized float pixels, as the HF processor gives them: the wire carries uint8 images."""
    tensors = req.mm_items[0].tensors
    tensors["pixel_values"] = tensors["pixel_values"].float() / 255


def two_frame_grid(req: EngineRequest) -> None:
    """Qwen2-VL: a video's grid (t = 2) with an image's pixels; this model takes images."""
    tensors = req.mm_items[0].tensors
    _, h, w = (int(x) for x in tensors["image_grid_thw"][0])
    tensors["image_grid_thw"] = torch.tensor([[2, h, w]])


def lazily_opened_truncated_png() -> Image.Image:
    return Image.open(io.BytesIO(TRUNCATED_PNG))  # decodes on first use, and fails then


def invalid(
    name: str, submit: Submit, match: str, code: str = "invalid_request", **kw: object
) -> BadInput:
    return BadInput(name, submit, InvalidRequest, code, match, **kw)


def media(name: str, source: object, match: str) -> BadInput:
    return BadInput(name, generate_with_image(source), MediaError, "invalid_media", match)


def generate_text(text: str | Callable[[Served], str]) -> Submit:
    def submit(s: Served, _: InFlight) -> object:
        prompt = text(s) if callable(text) else text
        return s.llm.generate(prompt, GREEDY, use_tqdm=False)

    return submit


def generate_multi_modal_data(data: dict[str, object]) -> Submit:
    def submit(s: Served, _: InFlight) -> object:
        prompt = {"prompt": prompt_text(s.arch, QUESTION, 1), "multi_modal_data": data}
        return s.llm.generate(prompt, GREEDY, use_tqdm=False)

    return submit


TOO_LONG = "prompt_too_long"
MISMATCH = "placeholder_mismatch"

BAD_INPUTS = [
    # prompt length and token ids
    invalid(
        "over_max_model_len",
        generate_text("the dog " * 100),
        f"length is {MAX_MODEL_LEN}",
        TOO_LONG,
    ),
    invalid("media_push_over_max", submit_media_over_limit, "media tokens included", TOO_LONG),
    invalid(
        "exactly_max_model_len",
        add_by_hand(lambda s: [5] * MAX_MODEL_LEN),
        rf"has {MAX_MODEL_LEN} tokens.*no room for an output token",
        TOO_LONG,
    ),
    invalid("empty_prompt", add_by_hand(lambda s: []), "the prompt is empty"),
    invalid(
        "token_past_vocab", add_by_hand(lambda s: [1, vocab_size(s)]), r"must be in \[0, \d+\)"
    ),
    invalid("negative_token", add_by_hand(lambda s: [1, -1]), "token ids must be in"),
    # placeholders vs images
    invalid(
        "2_placeholders_1_image",
        generate_with_counts(2, 1),
        "2 image placeholders .* but 1 images",
        MISMATCH,
    ),
    invalid(
        "1_placeholder_2_images",
        generate_with_counts(1, 2),
        "1 image placeholders .* but 2 images",
        MISMATCH,
    ),
    invalid(
        "0_placeholders_1_image",
        generate_with_counts(0, 1),
        "0 image placeholders .* but 1 images",
        MISMATCH,
    ),
    invalid(
        "1_placeholder_0_images",
        generate_text(lambda s: prompt_text(s.arch, QUESTION, 1)),
        "1 image placeholders .* but 0 images",
        MISMATCH,
    ),
    invalid(
        "video", generate_multi_modal_data({"video": [b""]}), r"unsupported modalities \['video'\]"
    ),
    # corrupt, empty or unreachable media
    media("corrupt_bytes", CORRUPT_BYTES, "cannot decode image"),
    media("corrupt_data_url", data_url(CORRUPT_BYTES), "cannot decode image"),
    media("data_url_not_base64", "data:image/png;base64,@@not base64@@", "not valid base64"),
    media("truncated_png", TRUNCATED_PNG, "truncated"),
    media("truncated_png_data_url", data_url(TRUNCATED_PNG), "truncated"),
    BadInput(
        "truncated_png_lazy_pil",  # a fresh lazily opened image each time: it fails once opened
        lambda s, f: generate_with_image(lazily_opened_truncated_png())(s, f),
        MediaError,
        "invalid_media",
        "truncated",
    ),
    media("zero_size_pil", Image.new("RGB", (0, 0)), r"no pixels \(0x0\)"),
    media("zero_width_pil", Image.new("RGB", (0, 12)), r"no pixels \(0x12\)"),
    media("zero_size_png_bytes", handmade_png(0, 0), "cannot decode image"),
    media("decompression_bomb", handmade_png(100_000, 100_000), "decompression bomb"),
    media("image_of_wrong_type", 42, "unsupported image source of type int"),
    BadInput(
        "image_not_in_a_list",
        generate_multi_modal_data({"image": 42}),
        MediaError,
        "invalid_media",
        "unsupported image source of type int",
    ),
    media("remote_url_not_allowed", "https://example.com/cat.png", "unsupported image source"),
    media("local_path_not_allowed", Path(__file__), "local image paths are not allowed"),
    # tensors that do not match their placeholders (a buggy or hostile frontend)
    invalid("pixel_values_wrong_shape", add_tampered(shrink_pixel_values), "pixel_values of shape"),
    invalid("pixel_values_missing", add_tampered(drop_pixel_values), "lacks a .*'pixel_values'"),
    invalid(
        "placeholder_too_short",
        add_tampered(shorten_placeholder),
        r"tensors give \d+ tokens but its placeholder has \d+",
    ),
    invalid(
        "placeholder_past_end",
        add_tampered(move_placeholder_past_end),
        r"placeholder range \d+\+\d+ is invalid",
    ),
    invalid(
        "placeholders_overlap",
        add_tampered(overlap_placeholders, num_images=2),
        r"placeholder range \d+\+\d+ is invalid",
    ),
    invalid(
        "unmergeable_patch_grid",
        add_tampered(unmergeable_grid),
        r"image_grid_thw .* is not a valid patch grid",
        archs=("qwen2_vl",),
    ),
    invalid(
        "video_grid_on_image_pixels",
        add_tampered(two_frame_grid),
        r"image_grid_thw \[2, .* is not a valid patch grid",
        archs=("qwen2_vl",),
    ),
    invalid(
        "pixels_not_resizing_to_the_grid",
        add_tampered(crop_unresized_image),
        r"pixel_values of shape \(1, 40, 20, 3\) do not resize to image_grid_thw \[1, 4, 4\]",
        archs=("qwen2_vl",),
    ),
    invalid(
        "unresized_pixels_over_max_pixels",
        add_tampered(unresized_image_above_max_pixels),
        r"pixel_values of shape \(1, 300, 250, 3\) do not resize to image_grid_thw",
        archs=("qwen2_vl",),
    ),
    invalid(
        "float_pixels",
        add_tampered(float_pixel_values),
        r"pixel_values of shape .* \(torch.float32\), expected .* uint8",
    ),
    # request ids and sampling parameters
    invalid(
        "duplicate_req_id", submit_duplicate_req_id, r"request id 'good-\d' is already running"
    ),
    invalid("max_tokens_0", generate_with_params(max_tokens=0), "max_tokens must be at least 1"),
    invalid("top_p_0", generate_with_params(top_p=0.0), r"top_p must be in \(0, 1\]"),
    invalid(
        "negative_temperature", generate_with_params(temperature=-0.5), "temperature must be >= 0"
    ),
    invalid(
        "nan_temperature", generate_with_params(temperature=float("nan")), "must be >= 0, got nan"
    ),
]


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda b: b.name)
def test_bad_input_fails_alone(bad: BadInput, engine_idle_after: Served) -> None:
    served = engine_idle_after
    if served.arch not in bad.archs:
        pytest.skip(f"{bad.name} applies to {bad.archs} only")
    flight = InFlight(served)
    with pytest.raises(bad.error, match=bad.match) as info:
        bad.submit(served, flight)
    assert info.value.code == bad.code
    assert isinstance(info.value, MMRuntimeError)
    assert set(served.llm.engine.requests) == set(flight.req_ids)  # nothing of it was queued
    flight.finish_and_check()


def test_engine_keeps_serving_after_many_bad_inputs(engine_idle_after: Served) -> None:
    """Every bad input in turn, a step after every third (the good requests must outlive them
    all), then a good request that arrives after them."""
    served = engine_idle_after
    flight = InFlight(served, num_steps=1)
    applicable = [bad for bad in BAD_INPUTS if served.arch in bad.archs]
    for i, bad in enumerate(applicable):
        with pytest.raises(bad.error, match=bad.match):
            bad.submit(served, flight)
        if i % 3 == 2:
            flight.step()
    assert served.llm.engine.has_unfinished_requests()
    flight.add("late", 1)
    flight.finish_and_check()


def test_nan_features_stay_in_their_request(
    engine_idle_after: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose encoder output is NaN (uint8 pixels cannot be; a broken encoder or
    weights can) runs, and writes NaN K/V into its blocks. Requests that reuse those blocks
    after it must not see them."""
    served = engine_idle_after
    engine = served.llm.engine
    image = random_image(40, 40, seed=9)
    prompt = mm_prompt(prompt_text(served.arch, QUESTION * 6, 1), [image])
    poisoned = served.llm.build_request(prompt, GREEDY, req_id="nan")
    nan_hash = poisoned.mm_items[0].mm_hash
    encode = engine.runner.model.encode

    def encode_nan(items: list) -> list[torch.Tensor]:
        outs = encode(items)
        return [
            o.fill_(float("nan")) if item.mm_hash == nan_hash else o
            for item, o in zip(items, outs, strict=True)
        ]

    monkeypatch.setattr(engine.runner.model, "encode", encode_nan)
    engine.add_request(poisoned)
    poisoned_block_ids: set[int] = set()
    while engine.has_unfinished_requests():
        engine.step()
        poisoned_block_ids |= set(engine.kv.block_ids("nan"))
    monkeypatch.undo()
    flight = InFlight(served)
    good_block_ids = {b for r in flight.req_ids for b in engine.kv.block_ids(r)}
    assert good_block_ids & poisoned_block_ids  # the good requests do reuse the NaN blocks
    flight.finish_and_check()


# ---- prompt length at the boundary ----


def run_alone(served: Served, num_prompt_tokens: int) -> tuple[list[int], str | None]:
    engine = served.llm.engine
    req = EngineRequest(
        req_id="edge", prompt_token_ids=[5] * num_prompt_tokens, sampling_params=GREEDY
    )
    engine.add_request(req)
    tokens, finish_reason = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
            finish_reason = out.finish_reason
    return tokens, finish_reason


@pytest.mark.parametrize(
    ("num_prompt_tokens", "num_output_tokens"),
    [(MAX_MODEL_LEN - 1, 1), (MAX_MODEL_LEN - 8, 8), (MAX_MODEL_LEN - 16, 16)],
)
def test_output_stops_at_max_model_len(
    engine_idle_after: Served, num_prompt_tokens: int, num_output_tokens: int
) -> None:
    """The longest prompt accepted is max_model_len - 1: one token, then finish "length"."""
    tokens, finish_reason = run_alone(engine_idle_after, num_prompt_tokens)
    assert len(tokens) == num_output_tokens
    assert finish_reason == "length"


# ---- very small and extreme images ----

SMALL_SIZES = [(1, 1), (2, 3), (1, 28), (1, 200), (1, 500), (500, 1), (3, 1000)]


@pytest.mark.parametrize("size", SMALL_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiny_or_extreme_image_generates_or_fails_cleanly(
    engine_idle_after: Served, size: tuple[int, int]
) -> None:
    """The HF processors upscale some of these and reject others (Qwen2-VL: aspect ratio over
    200); either way the result is HF's tokens or an `MMRuntimeError`, never another exception.
    Those that pass give odd patch grids (Qwen2-VL: 1 wide, 200 high -> 58x2), so compare."""
    served = engine_idle_after
    text, image = prompt_text(served.arch, QUESTION, 1), random_image(*size, seed=4)
    try:
        out = served.llm.generate(mm_prompt(text, [image]), GREEDY, use_tqdm=False)
    except MMRuntimeError as e:
        assert e.code in ("invalid_media", "invalid_request"), e
        assert "x".join(map(str, size)) in e.message or str(size) in e.message, e
    else:
        model_dir = served.llm.engine.info.model_dir
        expected = hf_greedy(model_dir, text, [image], max_new_tokens=GREEDY.max_tokens)
        assert out[0].outputs[0].token_ids == expected
    assert not served.llm.engine.has_unfinished_requests()


# ---- invalid sampling parameters, wherever they are built ----

BAD_PARAMS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"logprobs": -1}, "logprobs"),
]


@pytest.mark.parametrize(("kwargs", "field_name"), BAD_PARAMS, ids=lambda x: str(x))
def test_invalid_sampling_params(kwargs: dict[str, object], field_name: str) -> None:
    """Rejected when built in Python and when decoded from the wire (msgspec runs the check)."""
    with pytest.raises(InvalidRequest, match=field_name) as info:
        SamplingParams(**kwargs)
    assert info.value.code == "invalid_request"
    with pytest.raises(InvalidRequest, match=field_name):
        msgspec.msgpack.decode(msgspec.msgpack.encode(kwargs), type=SamplingParams)


# ---- model directories that cannot be served ----


def copy_with_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("model_type", "architecture"),
    [
        ("mamba", "MambaForCausalLM"),  # known to transformers, not served by us
        ("llama", "LlamaForCausalLM"),  # text-only
        ("not_a_real_model", "NotARealModel"),  # unknown to transformers too
    ],
)
@pytest.mark.parametrize("arch", ARCHS)
def test_unknown_architecture(
    tiny_models: dict[str, Path], tmp_path: Path, arch: str, model_type: str, architecture: str
) -> None:
    model_dir = copy_with_config(
        tiny_models[arch], tmp_path / "m", model_type=model_type, architectures=[architecture]
    )
    with pytest.raises(ConfigError) as info:
        LLM(model_dir, device="cpu")
    message = info.value.message
    assert info.value.code == "config_error"
    assert repr(model_type) in message and architecture in message
    assert "supported: llava, qwen2_vl" in message


def test_not_a_model_directory(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        LLM(tmp_path, device="cpu")
    shutil.copytree(tiny_models["llava"], tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read .*config.json"):
        LLM(tmp_path / "m", device="cpu")
