"""The `mm-runtime` command: one argparse subcommand per tool, each run by a `_cmd_*` handler.

A subcommand is added by an `_add_*` function (its parser, flags and handler) called from
`_build_parser`. This is the process entry point, so logging is configured here (level from
MM_RUNTIME_LOG_LEVEL, the runtime's only environment variable).
"""

import argparse
import logging
import os
from collections.abc import Callable

from mm_runtime.shared.errors import MMRuntimeError
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
    _add_make_tiny_model(subparsers)
    return parser


def _setup_logging() -> None:
    level = os.environ.get("MM_RUNTIME_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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
