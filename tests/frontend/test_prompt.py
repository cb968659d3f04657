"""Prompt building: placeholder expansion and chat templates give exactly the HF processor's ids.

The reference is the model's own `AutoProcessor` on the same directory: its `input_ids` for the
same text and images, and its `apply_chat_template` text for the same conversation.
"""

import base64
import io
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
from mm_testing import ARCHS, prompt_text, random_image
from PIL import Image
from transformers import AutoProcessor

from mm_runtime.frontend.media import load_image_bytes
from mm_runtime.frontend.prompt import PromptBuilder
from mm_runtime.preprocess_worker.processors import ImageProcessor, convert_image, decode_image
from mm_runtime.shared.errors import InvalidRequest
from mm_runtime.shared.model_info import IMAGE_PLACEHOLDERS, ModelInfo
from mm_runtime.shared.wire import PlaceholderRange


@dataclass
class Frontend:
    arch: str
    info: ModelInfo
    prompts: PromptBuilder
    images: ImageProcessor
    hf: object  # the HF AutoProcessor: the reference

    def num_tokens(self, images: list[Image.Image]) -> list[int]:
        return [self.images(image).num_tokens for image in images]

    def hf_ids(
        self, text: str, images: list[Image.Image], add_special_tokens: bool = True
    ) -> list[int]:
        out = self.hf(text=text, images=images or None, add_special_tokens=add_special_tokens)
        return list(out["input_ids"][0])


@pytest.fixture(scope="module", params=ARCHS)
def frontend(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Frontend:
    info = ModelInfo.from_model_dir(tiny_models[request.param])
    hf = AutoProcessor.from_pretrained(info.model_dir)
    return Frontend(request.param, info, PromptBuilder(info), ImageProcessor(info), hf)


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: the decoded pixels equal the PIL image's
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---- placeholder expansion ----

# (question, image sizes): Qwen2-VL's token count follows the size; LLaVA's is fixed.
EXPANSION_CASES = [
    ("Describe the weather today.", []),
    ("What is in this image?", [(64, 48)]),
    ("Compare the two pictures.", [(40, 90), (120, 64)]),
    ("Three of them:", [(28, 28), (200, 30), (1, 1)]),
]


@pytest.mark.parametrize("case", EXPANSION_CASES, ids=lambda c: f"{len(c[1])}_images")
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_expansion_matches_hf_processor(
    frontend: Frontend, case: tuple, add_special_tokens: bool
) -> None:
    question, sizes = case
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    text = prompt_text(frontend.arch, question, len(images))
    assert frontend.prompts.count_images(text) == len(images)
    num_tokens = frontend.num_tokens(images)
    ids, ranges = frontend.prompts.tokenize(text, num_tokens, add_special_tokens)
    assert ids == frontend.hf_ids(text, images, add_special_tokens)
    check_ranges(frontend, ids, ranges, num_tokens)


def check_ranges(
    frontend: Frontend, ids: list[int], ranges: list[PlaceholderRange], num_tokens: list[int]
) -> None:
    """One contiguous run of image tokens per image, in order, and no image token elsewhere.
    (Runs may touch: LLaVA's `<image><image>` gives two adjacent runs.)"""
    image_token_id = frontend.info.image_token_id
    assert [r.length for r in ranges] == num_tokens
    for r in ranges:
        assert ids[r.offset : r.offset + r.length] == [image_token_id] * r.length
    for r, after in itertools.pairwise(ranges):
        assert r.offset + r.length <= after.offset  # in order, no overlap
    covered = {i for r in ranges for i in range(r.offset, r.offset + r.length)}
    assert covered == {i for i, t in enumerate(ids) if t == image_token_id}
    if frontend.arch == "qwen2_vl":  # the run sits between its vision markers
        tokenizer = frontend.prompts.tokenizer
        start, end = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
        for r in ranges:
            assert ids[r.offset - 1] == start and ids[r.offset + r.length] == end


def test_token_count_per_image_matches_hf(frontend: Frontend) -> None:
    """The count the frontend expands to is the count HF's processor inserts for that image."""
    text = prompt_text(frontend.arch, "What is it?", 1)
    for w, h in [(64, 48), (17, 300), (300, 17), (2, 2)]:
        image = random_image(w, h, seed=w)
        (num,) = frontend.num_tokens([image])
        hf_ids = frontend.hf_ids(text, [image])
        assert hf_ids.count(frontend.info.image_token_id) == num, (w, h)


def test_placeholders_next_to_text_and_each_other(frontend: Frontend) -> None:
    """No spaces around placeholders: the tokenizer must not merge them with the text."""
    placeholder = IMAGE_PLACEHOLDERS[frontend.arch]
    text = f"a{placeholder}{placeholder}b{placeholder}"
    images = [random_image(30 + 10 * i, 40, seed=i) for i in range(3)]
    num_tokens = frontend.num_tokens(images)
    ids, ranges = frontend.prompts.tokenize(text, num_tokens)
    assert ids == frontend.hf_ids(text, images)
    check_ranges(frontend, ids, ranges, num_tokens)


@pytest.mark.parametrize(("num_placeholders", "num_images"), [(2, 1), (1, 2), (0, 1), (1, 0)])
def test_placeholder_count_mismatch(
    frontend: Frontend, num_placeholders: int, num_images: int
) -> None:
    text = prompt_text(frontend.arch, "What is it?", num_placeholders)
    with pytest.raises(InvalidRequest) as info:
        frontend.prompts.tokenize(text, [4] * num_images)
    assert info.value.code == "placeholder_mismatch"
    message = info.value.message
    assert f"{num_placeholders} image placeholders" in message
    assert f"{num_images} images were given" in message
    assert IMAGE_PLACEHOLDERS[frontend.arch] in message  # tells the user what to write


# ---- chat template ----


def hf_template(frontend: Frontend, messages: list[dict], add_generation_prompt: bool) -> str:
    return frontend.hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def as_hf(messages: list[dict]) -> list[dict]:
    """The same conversation as HF's processor takes it: every image part is {"type": "image"}."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [p if p["type"] == "text" else {"type": "image"} for p in content]
        out.append({"role": m["role"], "content": content})
    return out


IMG_A = random_image(64, 48, seed=11)
IMG_B = random_image(40, 90, seed=12)
IMG_C = random_image(33, 77, seed=13)


def conversation() -> list[dict]:
    """A system prompt, string and list content, and image parts in every accepted form."""
    return [
        {"role": "system", "content": "You answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look at this:"},
                {"type": "image_url", "image_url": {"url": png_data_url(IMG_A)}},
                {"type": "image_pil", "image_pil": IMG_B},
            ],
        },
        {"role": "assistant", "content": "Two pictures."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": IMG_C},
                {"type": "text", "text": "And this one?"},
            ],
        },
    ]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(frontend: Frontend, add_generation_prompt: bool) -> None:
    messages = conversation()
    text, images = frontend.prompts.apply_chat_template(messages, add_generation_prompt)
    assert text == hf_template(frontend, as_hf(messages), add_generation_prompt)
    assert frontend.prompts.count_images(text) == 3
    assert images[0] == png_data_url(IMG_A)  # URLs are passed on, loaded later
    assert images[1] is IMG_B and images[2] is IMG_C


def test_chat_prompt_ids_match_hf(frontend: Frontend) -> None:
    """End to end in the frontend: template, load each image (the data URL too), expand,
    tokenize without adding a second BOS; HF's processor on the same text and pixels agrees."""
    text, refs = frontend.prompts.apply_chat_template(conversation())
    loaded = [
        convert_image(ref)
        if isinstance(ref, Image.Image)
        else decode_image(load_image_bytes(ref)[0])
        for ref in refs
    ]
    num_tokens = frontend.num_tokens(loaded)
    ids, ranges = frontend.prompts.tokenize(text, num_tokens, add_special_tokens=False)
    hf_text = hf_template(frontend, as_hf(conversation()), True)
    assert ids == frontend.hf_ids(hf_text, [IMG_A, IMG_B, IMG_C], add_special_tokens=False)
    check_ranges(frontend, ids, ranges, num_tokens)


@pytest.mark.parametrize(
    "content",
    [
        "Hello there, what is the weather?",
        [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}],
        [{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}],  # bare string URL
    ],
    ids=["string", "text_parts", "url_string"],
)
def test_chat_single_message_forms(frontend: Frontend, content: object) -> None:
    messages = [{"role": "user", "content": content}]
    text, images = frontend.prompts.apply_chat_template(messages)
    assert text == hf_template(frontend, as_hf(messages), True)
    assert len(images) == frontend.prompts.count_images(text)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"content": "hi"}], "must be a dict with a 'role'"),
        (["hi"], "must be a dict with a 'role'"),
        ([{"role": "user", "content": [{"type": "audio_url"}]}], "'audio_url'"),
        ([{"role": "user", "content": ["just a string"]}], "unsupported content part type"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": 3}]}], "URL string"),
        ([{"role": "user", "content": [{"type": "image_pil", "image_pil": None}]}], "PIL image"),
    ],
    ids=["no_role", "not_a_dict", "audio", "bare_string_part", "url_int", "pil_none"],
)
def test_chat_bad_messages(frontend: Frontend, messages: list, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        frontend.prompts.apply_chat_template(messages)


def test_chat_without_template(frontend: Frontend) -> None:
    builder = PromptBuilder(frontend.info)
    builder.chat_template = None
    with pytest.raises(InvalidRequest, match="no chat template"):
        builder.apply_chat_template([{"role": "user", "content": "hi"}])


def test_token_id_prompts_are_taken_as_they_are(frontend: Frontend) -> None:
    """A prompt of token ids carries no images, so an image token in it is refused: no image
    would fill its place."""
    ids = frontend.prompts.tokenizer("Hello there")["input_ids"]
    assert frontend.prompts.tokenize(ids, []) == (ids, [])
    with pytest.raises(InvalidRequest, match="cannot carry images"):
        frontend.prompts.tokenize(ids, [4])
    with pytest.raises(InvalidRequest, match="holds 1 image tokens, expected 0") as info:
        frontend.prompts.tokenize([*ids, frontend.info.image_token_id], [])
    assert info.value.code == "placeholder_mismatch"
