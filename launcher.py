"""`mm-runtime serve`: starts the frontend (this process, with its HTTP API), the preprocess
workers and the GPU worker, wired with ZeroMQ over IPC sockets in a private temp dir.

The frontend process is the parent: it watches its children, replaces crashed preprocess
workers, and exits non-zero when the GPU worker dies. Ctrl-C / SIGTERM stop every child and
remove the socket folder.
"""

import asyncio
import functools
import logging
import multiprocessing
import signal
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess

from mm_runtime.frontend.http_api import HttpServer
from mm_runtime.frontend.preprocess_pool import PreprocessPool
from mm_runtime.frontend.server import Frontend
from mm_runtime.gpu_worker.worker import run_gpu_worker
from mm_runtime.preprocess_worker.worker import run_preprocess_worker
from mm_runtime.shared.config import FrontendConfig, GpuWorkerConfig
from mm_runtime.shared.errors import MMRuntimeError
from mm_runtime.shared.zmq_io import IpcPaths

logger = logging.getLogger(__name__)


def _preprocess_process(ctx: SpawnContext, model: str, address: str) -> BaseProcess:
    return ctx.Process(
        target=run_preprocess_worker, args=(model, address), name="mm-runtime-preprocess"
    )


def build_frontend(frontend_config: FrontendConfig, gpu_config: GpuWorkerConfig) -> Frontend:
    """The frontend with its (not yet started) children."""
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once torch has threads
    ipc = IpcPaths.create()
    gpu = ctx.Process(
        target=run_gpu_worker,
        args=(gpu_config, ipc.gpu_input, ipc.gpu_output, frontend_config.feature_cache_bytes),
        name="mm-runtime-gpu-worker",
    )
    spawn = functools.partial(_preprocess_process, ctx, frontend_config.model, ipc.preprocess)
    pool = PreprocessPool(ipc.preprocess, frontend_config.preprocess_workers, spawn)
    return Frontend(frontend_config, ipc, gpu, pool)


def serve(frontend_config: FrontendConfig, gpu_config: GpuWorkerConfig) -> int:
    """Runs the server until Ctrl-C / SIGTERM (exit 0) or the GPU worker dies (exit 1)."""
    return asyncio.run(_serve(build_frontend(frontend_config, gpu_config)))


async def _serve(frontend: Frontend) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, frontend.stopped.set)
    config = frontend.config
    http = HttpServer(frontend, config.host, config.port)
    try:
        ready = await frontend.start()
        await http.start()
        logger.info(
            "serving %s (%s, %s on %s, %d KV blocks, max_model_len %d)",
            config.model,
            frontend.info.model_type,
            ready.dtype,
            ready.device,
            ready.num_kv_blocks,
            ready.max_model_len,
        )
        logger.info("SDK: mm_runtime.Client('tcp://%s:%d')", config.host, config.zmq_port)
        logger.info("OpenAI API: %s/v1 (model %r)", http.address, config.model_name)
        await frontend.stopped.wait()
    except MMRuntimeError as e:
        logger.error("server failed: %s", e)
        frontend.exit_code = 1
    finally:
        logger.info("shutting down")
        await http.stop()  # first: in-flight HTTP requests still get the frontend's answers
        await frontend.close()
    return frontend.exit_code
