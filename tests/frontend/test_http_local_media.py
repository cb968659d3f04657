"""Local image paths over HTTP (issue 6): `--allowed-local-media-path DIR`.

An `image_url` naming a file under DIR (a file:// URL, percent-escaped as `Path.as_uri()` writes
it, or a plain path) gives the same answer as the same image sent as a data URL; anything that
resolves outside DIR (an outside path, `..`, escaped `..`, a symlink out) is a 400 in OpenAI's
shape, and the server serves on. The unit-level checks are in test_media.py.
"""

import base64
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from mm_testing import assert_openai_error, random_image

from mm_runtime.frontend.sdk import media_bytes

ARCH = "llava"
GREEDY_HTTP = {"max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
PNG = media_bytes(random_image(36, 28, seed=21))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    (allowed / "sub dir").mkdir(parents=True)
    (allowed / "sub dir" / "my cat.png").write_bytes(PNG)  # spaces: %20 in its file URL
    (root / "secret.png").write_bytes(PNG)  # a real image: only the path may refuse it
    (allowed / "link.png").symlink_to(root / "secret.png")
    return allowed


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path], start_http: Callable, media_dir: Path) -> tuple:
    server, http = start_http(tiny_models[ARCH], allowed_local_media_path=str(media_dir))
    client = openai.OpenAI(base_url=f"{http.address}/v1", api_key="none", max_retries=0)
    return server, client


def ask(client: openai.OpenAI, model: str, url: str, stream: bool = False) -> object:
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What is in the picture?"},
    ]
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(
        model=model, messages=messages, stream=stream, **GREEDY_HTTP
    )


def test_file_under_the_allowed_folder(served: tuple, media_dir: Path) -> None:
    server, client = served
    model = server.frontend.config.model_name
    expected = ask(client, model, "data:image/png;base64," + base64.b64encode(PNG).decode())
    path = media_dir / "sub dir" / "my cat.png"
    assert "%20" in path.as_uri()
    for url in (path.as_uri(), f"file://localhost{path}", str(path)):
        out = ask(client, model, url)
        assert out.choices[0].message.content == expected.choices[0].message.content, url
        assert out.usage == expected.usage
    streamed = "".join(
        c.choices[0].delta.content or "" for c in ask(client, model, path.as_uri(), True)
    )
    assert streamed == expected.choices[0].message.content


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("{root}/secret.png", "outside the allowed local media path"),
        ("{allowed}/../secret.png", "outside the allowed local media path"),
        ("{allowed}/%2e%2e/secret.png", "outside the allowed local media path"),
        ("{allowed}/sub%20dir/../../secret.png", "outside the allowed local media path"),
        ("{allowed}/link.png", "outside the allowed local media path"),  # symlink out
        ("{allowed}/missing.png", "cannot read"),
        ("{allowed}/sub%20dir", "cannot read"),  # a folder
    ],
    ids=["outside", "dotdot", "escaped-dotdot", "deeper-dotdot", "symlink", "missing", "folder"],
)
def test_paths_outside_are_refused(served: tuple, media_dir: Path, url: str, match: str) -> None:
    server, client = served
    model = server.frontend.config.model_name
    url = "file://" + url.format(root=media_dir.parent, allowed=media_dir)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, model, url, stream)
        error = assert_openai_error(err.value.response.json(), "invalid_media")
        assert match in error["message"], error


def test_other_hosts_refused_then_serves_on(served: tuple, media_dir: Path) -> None:
    server, client = served
    model = server.frontend.config.model_name
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, model, f"file://otherhost{media_dir}/sub%20dir/my%20cat.png")
    assert "file:///path" in err.value.response.json()["error"]["message"]
    out = ask(client, model, (media_dir / "sub dir" / "my cat.png").as_uri())
    assert out.usage.completion_tokens == 8
    assert server.frontend.requests == {} and server.frontend.num_unfinished == 0
