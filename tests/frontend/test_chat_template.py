"""`--chat-template` (issue 6): a Jinja file, or the template text itself, replaces the model's
chat template for chat requests over HTTP and through the SDK alike (the frontend applies it).

The check is the prompt itself: a chat through the custom template gives the same greedy text
and prompt token count as a raw completion of the prompt that template renders by hand (and
not those of the model's own template). A bad template stops `mm-runtime serve` at startup with
one error line; a template's own raise_exception() is the request's 400.
"""

import base64
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from mm_testing import random_image

from mm_runtime import SamplingParams, cli
from mm_runtime.frontend.prompt import PromptBuilder, load_chat_template
from mm_runtime.frontend.sdk import Client, media_bytes
from mm_runtime.shared.config import FrontendConfig, GpuWorkerConfig
from mm_runtime.shared.errors import ConfigError, MMRuntimeError
from mm_runtime.shared.model_info import IMAGE_PLACEHOLDERS, ModelInfo

ARCH = "qwen2_vl"  # its tokenizer adds no BOS: a raw prompt tokenizes as the chat's does
TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('the marker template takes no system message') }}{% endif %}"
    "{% for m in messages %}<<{{ m['role'] | upper }}>>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}"
    "{% else %}" + IMAGE_PLACEHOLDERS[ARCH] + "{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<<ASSISTANT>>{% endif %}"
)
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
GREEDY_HTTP = {"max_tokens": 10, "temperature": 0, "extra_body": {"ignore_eos": True}}
IMAGE = random_image(40, 32, seed=5)


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("templates") / "marker.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path], start_http: Callable, template_file: Path) -> tuple:
    server, http = start_http(
        tiny_models[ARCH], chat_template=load_chat_template(str(template_file))
    )
    client = openai.OpenAI(base_url=f"{http.address}/v1", api_key="none", max_retries=0)
    return server, client


def messages_with_image(sdk: bool) -> list[dict[str, object]]:
    """The same user turn, its image as the SDK takes it (a PIL image) or as a data URL."""
    if sdk:
        image: dict[str, object] = {"type": "image", "image": IMAGE}
    else:
        url = "data:image/png;base64," + base64.b64encode(media_bytes(IMAGE)).decode()
        image = {"type": "image_url", "image_url": {"url": url}}
    return [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]


def test_custom_template_over_http_and_sdk(served: tuple, tiny_models: dict[str, Path]) -> None:
    server, client = served
    rendered = f"<<USER>>{IMAGE_PLACEHOLDERS[ARCH]}What is it?<<ASSISTANT>>"
    default, _ = PromptBuilder(ModelInfo.from_model_dir(tiny_models[ARCH])).apply_chat_template(
        messages_with_image(sdk=False)
    )
    assert default != rendered  # the model's own template: a system turn, <|im_start|> markers
    with Client(server.address, timeout_s=120) as sdk:
        expected = sdk.generate(rendered, [IMAGE], GREEDY)
        with_default = sdk.generate(default, [IMAGE], GREEDY)
        sdk_chat = sdk.chat(messages_with_image(sdk=True), GREEDY)
    assert with_default.usage.prompt_tokens != expected.usage.prompt_tokens
    assert sdk_chat.text == expected.text
    assert sdk_chat.usage.prompt_tokens == expected.usage.prompt_tokens

    model = server.frontend.config.model_name
    out = client.chat.completions.create(
        model=model, messages=messages_with_image(sdk=False), **GREEDY_HTTP
    )
    assert out.choices[0].message.content == expected.text
    assert out.usage.prompt_tokens == expected.usage.prompt_tokens

    text_only = [{"role": "user", "content": "Hi there"}]  # a string content: the other branch
    tokenizer = server.frontend.prompts.tokenizer
    out = client.chat.completions.create(model=model, messages=text_only, **GREEDY_HTTP)
    assert out.usage.prompt_tokens == len(tokenizer("<<USER>>Hi there<<ASSISTANT>>")["input_ids"])


def test_template_refusal_is_a_400(served: tuple) -> None:
    server, client = served
    model = server.frontend.config.model_name
    refused = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=refused, max_tokens=2)
    error = err.value.response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "takes no system message" in error["message"]
    with Client(server.address, timeout_s=60) as sdk, pytest.raises(MMRuntimeError) as sdk_err:
        sdk.chat(refused, GREEDY)
    assert sdk_err.value.code == "invalid_request"
    out = client.chat.completions.create(model=model, messages=refused[1:], **GREEDY_HTTP)
    assert out.usage.completion_tokens == 10
    assert server.frontend.requests == {}


def test_load_chat_template(tmp_path: Path, template_file: Path) -> None:
    assert load_chat_template(str(template_file)) == TEMPLATE
    assert load_chat_template(TEMPLATE) == TEMPLATE  # not a file: the text itself, as vLLM
    with pytest.raises(ConfigError, match="looks like a file path, but cannot be read"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ConfigError, match="looks like a file path"):
        load_chat_template(str(tmp_path))  # a folder
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(ConfigError, match=r"broken\.jinja.*not valid Jinja: line 2"):
        load_chat_template(str(broken))
    with pytest.raises(ConfigError, match="given inline is not valid Jinja"):
        load_chat_template("{% if %}")


def test_serve_passes_the_template_on(
    monkeypatch: pytest.MonkeyPatch, tiny_models: dict[str, Path], template_file: Path
) -> None:
    """`mm-runtime serve --chat-template FILE|TEXT` hands the text to the frontend's config."""
    seen: list[FrontendConfig] = []

    def fake_serve(frontend_config: FrontendConfig, gpu_config: GpuWorkerConfig) -> int:
        seen.append(frontend_config)
        return 0

    monkeypatch.setattr("mm_runtime.launcher.serve", fake_serve)
    monkeypatch.setattr(cli, "_setup_logging", lambda: None)  # keep pytest's log handlers
    model = str(tiny_models[ARCH])
    assert cli.main(["serve", "--model", model, "--chat-template", str(template_file)]) == 0
    assert cli.main(["serve", "--model", model, "--chat-template", "{{ 'inline' }}"]) == 0
    assert cli.main(["serve", "--model", model]) == 0
    assert [c.chat_template for c in seen] == [TEMPLATE, "{{ 'inline' }}", None]


def test_serve_refuses_a_bad_template(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """One error line and exit code 1, before any process starts; no traceback."""
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ messages[0]['content'] }\n")
    cases = {
        str(tmp_path / "missing.jinja"): "looks like a file path, but cannot be read",
        str(broken): "not valid Jinja: line 1",
    }
    procs = {
        value: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mm_runtime.cli",
                "serve",
                "--model",
                str(tiny_models[ARCH]),
                "--chat-template",
                value,
                "--device",
                "cpu",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for value in cases
    }
    for value, proc in procs.items():
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 1, output
        assert cases[value] in output and "Traceback" not in output, output
        assert "ERROR" in output and "preprocess worker" not in output, output  # none started
