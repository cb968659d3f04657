"""The engine core of the GPU worker: requests in, one scheduled step at a time, tokens out.

Runs in-process (the offline `LLM`, tests) or behind the GPU worker's socket loop. Bad requests
are rejected in `add_request` with an `InvalidRequest` naming the problem, before they can touch
shared state, so one bad request never costs another request its work.
"""

import logging
import time
from pathlib import Path

from transformers import GenerationConfig

from mm_runtime.gpu_worker.encoder_cache import EncoderCache
from mm_runtime.gpu_worker.kv_cache import KVCacheManager
from mm_runtime.gpu_worker.model_runner import ModelRunner, StepResult
from mm_runtime.gpu_worker.request import FINISH_REASONS, Request, RequestStatus
from mm_runtime.gpu_worker.sampler import make_generator
from mm_runtime.gpu_worker.scheduler import Scheduler, SchedulerOutput
from mm_runtime.shared.config import GpuWorkerConfig
from mm_runtime.shared.errors import InvalidRequest
from mm_runtime.shared.model_info import ModelInfo
from mm_runtime.shared.wire import EngineOutput, EngineRequest

logger = logging.getLogger(__name__)


def eos_token_ids(info: ModelInfo) -> frozenset[int]:
    """EOS ids as `generate` uses them: generation_config.json first, else the model config."""
    eos: int | list[int] | None = None
    if (Path(info.model_dir) / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(info.model_dir).eos_token_id
    if eos is None:
        eos = getattr(info.hf_config.get_text_config(), "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class EngineCore:
    def __init__(self, config: GpuWorkerConfig) -> None:
        self.config = config
        self.info = ModelInfo.from_model_dir(config.model)
        self.max_model_len = config.max_model_len or self.info.max_position_embeddings
        logger.info(
            "loading %s (%s, load_format=%s)",
            config.model,
            self.info.model_type,
            config.load_format,
        )
        start = time.perf_counter()
        self.runner = ModelRunner(config, self.info, self.max_model_len)
        logger.info("model loaded in %.1f s", time.perf_counter() - start)
        # On CUDA: a profile step first, the cache from what is left, then the decode graphs.
        self.num_kv_blocks = self.runner.num_kv_blocks_to_allocate()
        self.runner.allocate_kv_cache(self.num_kv_blocks)
        self.runner.capture_cuda_graphs()
        self.runner.warm_up()
        self.kv = KVCacheManager(
            self.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.encoder_cache = EncoderCache(config.encoder_cache_size)
        self.scheduler = Scheduler(config, self.kv, self.encoder_cache)
        self.eos_token_ids = eos_token_ids(self.info)
        self.requests: dict[str, Request] = {}  # req_id -> unfinished request
        # The step queued on the device whose outputs the next `step` call applies.
        self._in_flight: tuple[SchedulerOutput, StepResult] | None = None
        logger.info(
            "engine ready: %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d",
            self.info.model_type,
            self.runner.device,
            self.runner.dtype,
            self.num_kv_blocks,
            config.block_size,
            self.max_model_len,
        )

    # ---- requests in ----

    def add_request(self, request: EngineRequest) -> None:
        """Validates and queues a request; raises `InvalidRequest` and changes nothing if bad."""
        self._validate(request)
        params = request.sampling_params
        num_prompt = len(request.prompt_token_ids)
        req = Request(
            req_id=request.req_id,
            prompt_token_ids=list(request.prompt_token_ids),
            sampling_params=params,
            mm_items=list(request.mm_items),
            max_num_tokens=min(num_prompt + params.max_tokens, self.max_model_len),
        )
        if params.seed is not None:
            req.generator = make_generator(params.seed, self.runner.device)
        self.runner.model.prepare_request(req)
        self.requests[req.req_id] = req
        self.scheduler.add(req)

    def _validate(self, request: EngineRequest) -> None:
        if request.req_id in self.requests:
            raise InvalidRequest(f"request id {request.req_id!r} is already running")
        num_prompt = len(request.prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequest("the prompt is empty")
        if num_prompt >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {num_prompt} tokens (media tokens included), but the maximum "
                f"model length is {self.max_model_len}: no room for an output token",
                code="prompt_too_long",
            )
        vocab_size = self.runner.model.config.get_text_config().vocab_size
        if min(request.prompt_token_ids) < 0 or max(request.prompt_token_ids) >= vocab_size:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab_size})")
        max_len = min(num_prompt + request.sampling_params.max_tokens, self.max_model_len)
        needed_blocks = -(-max_len // self.config.block_size)
        usable_blocks = self.num_kv_blocks - 1  # block 0 is the null block
        if needed_blocks > usable_blocks:
            raise InvalidRequest(
                f"the request needs {needed_blocks} KV blocks ({max_len} tokens) but the cache "
                f"holds only {usable_blocks}; lower max_tokens or the prompt length"
            )
        end = 0
        for item in sorted(request.mm_items, key=lambda it: it.placeholder.offset):
            offset, length = item.placeholder.offset, item.placeholder.length
            if offset < end or offset + length > num_prompt or length <= 0:
                raise InvalidRequest(f"media item placeholder range {offset}+{length} is invalid")
            if length > self.config.encoder_cache_size:
                raise InvalidRequest(
                    f"a media item needs {length} encoder tokens, more than the encoder cache "
                    f"holds ({self.config.encoder_cache_size}); use a smaller image"
                )
            expected = self.runner.model.item_length(item)
            if expected != length:
                raise InvalidRequest(
                    f"media item tensors give {expected} tokens but its placeholder has {length}"
                )
            end = offset + length

    def abort_request(
        self, req_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> None:
        req = self.requests.pop(req_id, None)
        if req is not None:
            self.scheduler.finish(req, status)

    def has_unfinished_requests(self) -> bool:
        """Requests not finished, or a step in flight whose outputs are still to be applied."""
        return bool(self.requests) or self._in_flight is not None

    def stats(self) -> dict[str, float]:
        """Counters and gauges, by the metric names of DESIGN.md section 6 where one exists."""
        return {
            "mm_runtime_requests_running": len(self.scheduler.running),
            "mm_runtime_requests_waiting": len(self.scheduler.waiting),
            "mm_runtime_kv_cache_usage_ratio": self.kv.usage,
            "mm_runtime_prefix_cache_queries_tokens_total": self.kv.prefix_cache_queries_tokens,
            "mm_runtime_prefix_cache_hits_tokens_total": self.kv.prefix_cache_hits_tokens,
            "mm_runtime_encoder_cache_hits_total": self.encoder_cache.hits,
            "mm_runtime_encoder_cache_misses_total": self.encoder_cache.misses,
            "kv_num_blocks": self.num_kv_blocks,
            "kv_num_free_blocks": self.kv.num_free_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_encoded_items": self.runner.num_encoded_items,
        }

    # ---- one step ----

    def step(self) -> list[EngineOutput]:
        """Plans and queues step N+1, then applies and returns step N's outputs (async
        scheduling, as in vLLM V1): the host's work around a step (planning, inputs, outputs)
        runs while the GPU computes the step before it, so the GPU does not wait between steps.
        A request that stops on a token is found one step late; its token from the extra step
        is dropped. A length limit is known ahead, so it costs no extra step.
        """
        sched = self.scheduler.schedule()
        queued = None
        if sched.scheduled or sched.encoder_inputs:
            queued = (sched, self.runner.execute(sched, self.kv, self.encoder_cache))
        previous, self._in_flight = self._in_flight, queued
        return self._update(*previous) if previous is not None else []

    def _update(self, sched: SchedulerOutput, result: StepResult) -> list[EngineOutput]:
        """Applies a step's sampled tokens: outputs, stop checks, finished requests freed."""
        sampled = result.wait()
        outputs: list[EngineOutput] = []
        if sampled is not None:
            sampling = [s.req for s in sched.scheduled if s.samples]
            token_ids = sampled.token_ids.tolist()
            logprobs = sampled.to_token_logprobs([r.sampling_params.logprobs for r in sampling])
            for req, token, lp in zip(sampling, token_ids, logprobs, strict=True):
                req.num_pending_tokens -= 1
                if req.status.finished:
                    continue  # stopped (or aborted) while this step ran: the token is dropped
                req.token_ids.append(token)
                status = self._stop_status(req, token)
                if status is not None:
                    self.abort_request(req.req_id, status)
                outputs.append(
                    EngineOutput(
                        req_id=req.req_id,
                        new_token_ids=[token],
                        new_logprobs=None if lp is None else [lp],
                        finish_reason=FINISH_REASONS.get(status) if status else None,
                    )
                )
        for s in sched.scheduled:
            if not s.req.status.finished:
                self.scheduler.release_finished_items(s.req)
        return outputs

    def _stop_status(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        if not params.ignore_eos and token in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if req.num_tokens >= req.max_num_tokens:  # max_tokens or the model's maximum length
            return RequestStatus.FINISHED_LENGTH
        return None
