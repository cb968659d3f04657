"""mm-runtime: a serving runtime for multimodal language models.

Public surface: `LLM` (offline, in-process engine), `Client` / `AsyncClient` (the ZMQ SDK of a
running server) and `SamplingParams`. Imported lazily so that `import mm_runtime` stays cheap
for the CLI and the processes that need only part of it.
"""

from mm_runtime.shared.errors import MMRuntimeError
from mm_runtime.shared.wire import SamplingParams

__all__ = ["LLM", "AsyncClient", "Client", "MMRuntimeError", "SamplingParams"]


def __getattr__(name: str) -> object:
    if name == "LLM":
        from mm_runtime.llm import LLM

        return LLM
    if name in ("Client", "AsyncClient"):
        from mm_runtime.frontend import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'mm_runtime' has no attribute {name!r}")
