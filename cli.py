"""The `mm-runtime` command: one argparse subcommand per tool, each run by a `_cmd_*` handler.

A subcommand is added by an `_add_*` function (its parser, flags and handler) called from
`_build_parser`. This is the process entry point, so logging is configured here (level from
MM_RUNTIME_LOG_LEVEL, the runtime's only environment variable).
"""

import argparse
import logging
from collections.abc import Callable

from mm_runtime.shared.config import (
    FrontendConfig,
    GpuWorkerConfig,
    parse_domains,
    parse_limit_mm_per_prompt,
)
from mm_runtime.shared.errors import MMRuntimeError
from mm_runtime.shared.logs import setup_process_logging
from mm_runtime.shared.model_dirs import write_model_dir
from mm_runtime.shared.tiny_models import ARCHS, write_tiny_model

logger = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the chosen subcommand, return its exit code."""
    args = _build_parser().parse_args(argv)
    _setup_logging()
    handler: Handler = args.handler
    try:
        return handler(args)
    except MMRuntimeError as e:  # a user error: one line, not a traceback
        logger.error("%s", e)
        return 1


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm-runtime", description="A serving runtime for multimodal language models."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(subparsers)
    _add_make_tiny_model(subparsers)
    _add_make_model_dir(subparsers)
    return parser


def _setup_logging() -> None:
    setup_process_logging("frontend")


def _add_make_tiny_model(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight model directory (for tests and demos)",
        description="Write a complete tiny random-weight Hugging Face model directory: config, "
        "weights, tokenizer, processor and chat template.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")
    p.add_argument("--arch", required=True, choices=ARCHS, help="model architecture")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--max-shard-size", default=None, help='shard the weights, e.g. "50KB" (default: one file)'
    )
    p.add_argument(
        "--legacy-layout",
        action="store_true",
        help="name the weights as the original hub checkpoints do",
    )
    p.set_defaults(handler=_cmd_make_tiny_model)


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    out = write_tiny_model(
        args.out_dir,
        args.arch,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        legacy_layout=args.legacy_layout,
    )
    logger.info("wrote tiny %s model to %s", args.arch, out)
    return 0


def _add_make_model_dir(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-model-dir",
        help="write a real-size model directory without weights (serve it with dummy weights)",
        description="Write config, tokenizer (the real special-token ids), processor and chat "
        "template of a real model, without weights, for benchmarks with --load-format dummy.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")
    p.add_argument(
        "--config",
        required=True,
        help="bench config JSON (hub config + preprocessor config), e.g. "
        "bench/configs/qwen2_vl_2b.json",
    )
    p.set_defaults(handler=_cmd_make_model_dir)


def _cmd_make_model_dir(args: argparse.Namespace) -> int:
    out = write_model_dir(args.out_dir, args.config)
    logger.info("wrote %s (no weights: serve with --load-format dummy)", out)
    return 0


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="start the server (frontend, preprocess workers, GPU worker)",
        description="Serve a model over the OpenAI-compatible HTTP API and the ZMQ SDK "
        "(mm_runtime.Client). Without --model, serves "
        "a tiny random-weight demo model: it proves the pipeline, its answers are random.",
    )
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: demo)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (OpenAI API)")
    p.add_argument("--zmq-port", type=int, default=5570, help="SDK port")
    p.add_argument(
        "--served-model-name", default=None, help="the HTTP API's model name (default: --model)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--preprocess-workers", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="KV pool size on CPU")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--feature-cache-gb", type=float, default=4.0)
    p.add_argument("--encoder-cache-tokens", type=int, default=None)
    p.add_argument("--limit-mm-per-prompt", default="image=4", help="e.g. image=4")
    p.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template file (or the template text itself) to use instead of the "
        "model's, for chat requests over HTTP and the SDK",
    )
    p.add_argument("--allowed-local-media-path", default=None)
    p.add_argument(
        "--allowed-media-domains",
        default="",
        help="comma list of hosts whose http(s) image URLs are fetched (default: none)",
    )
    p.add_argument("--media-fetch-timeout-s", type=float, default=10.0)
    p.add_argument("--max-media-fetch-mb", type=float, default=32.0)
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* requests"
    )
    p.add_argument("--max-request-body-mb", type=float, default=64.0)
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=4096,
        help="requests in the frontend beyond which new ones get 429",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs: run decode steps eagerly"
    )
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from mm_runtime.frontend.prompt import load_chat_template
    from mm_runtime.launcher import serve  # heavy imports only for this subcommand
    from mm_runtime.shared.tiny_models import tiny_model_dir

    # Read first: a bad template stops the command before any process starts.
    chat_template = None if args.chat_template is None else load_chat_template(args.chat_template)
    model = args.model
    if model is None:
        model = str(tiny_model_dir("qwen2_vl"))
        logger.warning("no --model: serving the tiny demo model %s (random answers)", model)
    frontend_config = FrontendConfig(
        model=model,
        host=args.host,
        port=args.port,
        zmq_port=args.zmq_port,
        served_model_name=args.served_model_name,
        preprocess_workers=args.preprocess_workers,
        feature_cache_gb=args.feature_cache_gb,
        allowed_local_media_path=args.allowed_local_media_path,
        chat_template=chat_template,
        allowed_media_domains=parse_domains(args.allowed_media_domains),
        media_fetch_timeout_s=args.media_fetch_timeout_s,
        max_media_fetch_mb=args.max_media_fetch_mb,
        api_key=args.api_key,
        max_request_body_mb=args.max_request_body_mb,
        max_waiting_requests=args.max_waiting_requests,
        limit_mm_per_prompt=parse_limit_mm_per_prompt(args.limit_mm_per_prompt),
    )
    gpu_config = GpuWorkerConfig(
        model=model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        encoder_cache_tokens=args.encoder_cache_tokens,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
    )
    return serve(frontend_config, gpu_config)


if __name__ == "__main__":
    raise SystemExit(main())
