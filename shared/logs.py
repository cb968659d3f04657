"""Logging set-up for each process's entry point: the level comes from MM_RUNTIME_LOG_LEVEL,
the runtime's only environment variable; the process name prefixes every line."""

import logging
import os


def setup_process_logging(process_name: str) -> None:
    level = os.environ.get("MM_RUNTIME_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {process_name} %(name)s: %(message)s",
        force=True,
    )
