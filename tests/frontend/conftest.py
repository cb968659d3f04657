"""A real fast tokenizer built locally: byte-level BPE trained on a tiny multilingual corpus.

Nothing can be downloaded here, so the tests train one (well under a second). Its few merges
leave many multi-byte characters split across tokens, which is what detokenization must handle.
Also a local HTTP server for http(s) media URLs, and real servers with their HTTP API.
"""

import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mm_testing import RunningServer, free_port
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mm_runtime.frontend.http_api import HttpServer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_end|>"]
CORPUS = [
    "héllo wörld 日本語 🙂",
    "hello world, the quick brown fox jumps over the lazy dog.",
    "日本語のテキストです。東京は大きい。",
    "Ça va? Über straße — naïve café, 🙂🙃 emoji!",
    "def main() -> None:\n    print('hi')\n",
]


def build_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerBase:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=SPECIAL_TOKENS[0],
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer()


class _MediaHandler(http.server.BaseHTTPRequestHandler):
    """Serves `files` (path -> bytes); `redirects` (path -> URL) answer 302."""

    files: dict[str, bytes] = {}
    redirects: dict[str, str] = {}

    def do_GET(self) -> None:
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.end_headers()
        elif self.path in self.files:
            data = self.files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # quiet tests


@pytest.fixture(scope="module")
def media_http() -> Iterator[tuple[str, type[_MediaHandler]]]:
    """A local HTTP server on 127.0.0.1 in a thread: (base URL, its handler class, whose
    `files` and `redirects` the test fills)."""
    handler = type("Handler", (_MediaHandler,), {"files": {}, "redirects": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def start_http() -> Iterator[Callable[..., tuple[RunningServer, HttpServer]]]:
    """`start(model_dir, **config)`: a real server (`RunningServer`, same config keywords) with
    its HTTP API on a free port, as (server, http); all are stopped after the module's tests."""
    started: list[tuple[RunningServer, HttpServer]] = []

    def start(model_dir: Path, **config: object) -> tuple[RunningServer, HttpServer]:
        server = RunningServer(model_dir, **config)
        http = HttpServer(server.frontend, "127.0.0.1", free_port())
        started.append((server, http))
        server.call(http.start())
        return server, http

    try:
        yield start
    finally:
        for server, http in reversed(started):
            if http.server.started:
                server.call(http.stop())
            server.close()
