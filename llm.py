"""`mm_runtime.LLM`: the offline, in-process engine, shaped like vLLM's `LLM` class.

Composes in one process what the server runs in three: the frontend's prompt building and
detokenization, the preprocess worker's image processing, and the GPU worker's engine core.
"""

import itertools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from mm_runtime.frontend.detokenizer import IncrementalDetokenizer
from mm_runtime.frontend.media import hash_pil_image, load_image_bytes
from mm_runtime.frontend.prompt import ImageRef, PromptBuilder
from mm_runtime.gpu_worker.engine import EngineCore
from mm_runtime.gpu_worker.model_runner import resolve_device
from mm_runtime.gpu_worker.request import RequestStatus
from mm_runtime.preprocess_worker.processors import (
    ImageProcessor,
    ProcessedImage,
    convert_image,
    decode_image,
)
from mm_runtime.shared.config import GpuWorkerConfig
from mm_runtime.shared.errors import InvalidRequest
from mm_runtime.shared.wire import EngineOutput, EngineRequest, MMItem, SamplingParams

Prompt = str | dict[str, Any]  # a string, or {"prompt": str, "multi_modal_data": {"image": ...}}
Message = dict[str, Any]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    # Per generated token: {token_id: logprob} for the sampled token and the top-n.
    logprobs: list[dict[int, float]] | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False


@dataclass(slots=True)
class _Pending:
    """An in-flight request: its output so far and, when it has stop strings, the detokenizer
    that watches for them. Without stop strings the text is decoded once, when it finishes:
    detokenizing every step costs about 6 us per request on the engine's thread (1.5 ms a step
    at batch 256, measured on the dev CPU), one decode at the end 0.2 us per token."""

    output: RequestOutput
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None  # per token, when the request asks for them


class LLM:
    """Offline batch inference: `generate(prompts, params)` and `chat(messages, params)`."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        load_format: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,  # None: _batch_defaults
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_gb: float = 1.0,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        encoder_cache_tokens: int | None = None,
        max_encoder_tokens_per_step: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
    ) -> None:
        default_seqs, default_tokens = _batch_defaults(resolve_device(device))
        self.config = GpuWorkerConfig(
            model=str(model),
            device=device,
            dtype=dtype,
            load_format=load_format,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs or default_seqs,
            max_num_batched_tokens=max_num_batched_tokens or default_tokens,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            kv_cache_memory_gb=kv_cache_memory_gb,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            encoder_cache_tokens=encoder_cache_tokens,
            max_encoder_tokens_per_step=max_encoder_tokens_per_step,
            seed=seed,
            enforce_eager=enforce_eager,
        )
        self.engine = EngineCore(self.config)
        self.prompts = PromptBuilder(self.engine.info)
        self.image_processor = ImageProcessor(self.engine.info)
        self._req_ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.prompts.tokenizer

    # ---- input processing (the frontend's and preprocess worker's jobs, in-process) ----

    def build_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams,
        req_id: str | None = None,
        add_special_tokens: bool = True,
    ) -> EngineRequest:
        """Tokenizes a prompt and processes its images; raises on bad input, changes nothing."""
        (request,) = self.build_requests([prompt], [sampling_params], add_special_tokens, [req_id])
        return request

    def build_requests(
        self,
        prompts: Sequence[Prompt],
        sampling_params: Sequence[SamplingParams],
        add_special_tokens: bool = True,
        req_ids: Sequence[str | None] | None = None,
    ) -> list[EngineRequest]:
        """`build_request` for many prompts: their images are loaded and processed by a thread
        pool (PIL and the processor's torch ops release the GIL, so this scales with cores, as
        the server's preprocess workers do); tokenizing stays on this thread."""
        split = [_split_prompt(p) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            processed = list(pool.map(self._process_images, [images for _, images in split]))
        requests = []
        ids = req_ids if req_ids is not None else [None] * len(prompts)
        for (text, _), items, params, req_id in zip(
            split, processed, sampling_params, ids, strict=True
        ):
            token_ids, ranges = self.prompts.tokenize(
                text, [p.num_tokens for _, p in items], add_special_tokens
            )
            mm_items = [
                MMItem(modality="image", mm_hash=mm_hash, placeholder=r, tensors=p.tensors)
                for (mm_hash, p), r in zip(items, ranges, strict=True)
            ]
            request = EngineRequest(
                req_id=req_id if req_id is not None else str(next(self._req_ids)),
                prompt_token_ids=token_ids,
                sampling_params=params,
                mm_items=mm_items,
            )
            requests.append(request)
        return requests

    def _process_images(self, images: list[ImageRef]) -> list[tuple[str, ProcessedImage]]:
        loaded = [_load_image(image) for image in images]  # all, before any processing
        return [(mm_hash, self.image_processor(image, pixels)) for image, pixels, mm_hash in loaded]

    # ---- public API ----

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One output per prompt, in the order given. Bad input raises before any work starts."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        params = _params_per_prompt(sampling_params, len(prompts))
        requests = self.build_requests(prompts, params)
        texts = [p if isinstance(p, str) else p.get("prompt", "") for p in prompts]
        return self._run(requests, texts, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """OpenAI-style conversations (text and image_url / PIL image parts), one output each."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        params = _params_per_prompt(sampling_params, len(conversations))
        prompts: list[Prompt] = []
        for conversation in conversations:
            text, images = self.prompts.apply_chat_template(conversation, add_generation_prompt)
            prompts.append({"prompt": text, "multi_modal_data": {"image": images}})
        # The template already holds the special tokens (BOS); do not add them twice.
        requests = self.build_requests(prompts, params, add_special_tokens=False)
        return self._run(requests, [p["prompt"] for p in prompts], use_tqdm)

    # ---- the loop ----

    def _run(
        self, requests: list[EngineRequest], texts: list[str], use_tqdm: bool
    ) -> list[RequestOutput]:
        pending: dict[str, _Pending] = {}
        for request, text in zip(requests, texts, strict=True):
            try:
                self.engine.add_request(request)
            except Exception:
                for req_id in pending:
                    self.engine.abort_request(req_id)
                raise
            stop = request.sampling_params.stop
            detok = (
                IncrementalDetokenizer(self.prompts.tokenizer, request.prompt_token_ids, stop)
                if stop
                else None
            )
            output = RequestOutput(request.req_id, text, request.prompt_token_ids, [])
            pending[request.req_id] = _Pending(output, detok)
        results = [pending[r.req_id].output for r in requests]
        with tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if self._apply(pending[out.req_id], out):
                        bar.update(1)
        return results

    def _apply(self, p: _Pending, out: EngineOutput) -> bool:
        """Applies one step's output to a request; True when the request just finished (its
        output is filled in then)."""
        if out.error is not None:
            raise InvalidRequest(out.error.message, code=out.error.code)
        p.token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None:
            p.logprobs = p.logprobs if p.logprobs is not None else []
            p.logprobs += [
                {lp.token_id: lp.logprob for lp in [t.sampled, *t.top]} for t in out.new_logprobs
            ]
        finish_reason = out.finish_reason
        if p.detokenizer is not None:
            p.detokenizer.update(out.new_token_ids, finished=out.finished)
            if p.detokenizer.stopped and finish_reason is None:
                self.engine.abort_request(out.req_id, RequestStatus.FINISHED_STOPPED)
                finish_reason = "stop"
        if finish_reason is None:
            return False
        if p.detokenizer is not None:
            text = p.detokenizer.output_text
        else:  # what the incremental detokenizer ends with, in one decode
            text = self.prompts.tokenizer.decode(p.token_ids, skip_special_tokens=True)
        p.output.outputs = [CompletionOutput(0, text, p.token_ids, finish_reason, p.logprobs)]
        p.output.finished = True
        return True


def _batch_defaults(device: torch.device) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) for an LLM that names neither: vLLM V1's defaults
    for its LLM class (EngineArgs.get_batch_defaults). An offline batch has no latency to keep,
    so on a GPU of 70 GiB or more 1024 requests run at once, in steps of up to 16384 tokens;
    not on an A100, where vLLM measured the larger step slower. Elsewhere GpuWorkerConfig's own
    (256 and 8192), as the server's."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        if props.total_memory >= 70 * 2**30 and "A100" not in props.name:
            return 1024, 16384
    defaults = {f.name: f.default for f in fields(GpuWorkerConfig)}
    return defaults["max_num_seqs"], defaults["max_num_batched_tokens"]


def _load_image(source: object) -> tuple[Image.Image, np.ndarray | None, str]:
    """One image of a prompt -> (RGB image, its pixels if read already, mm_hash): the frontend's
    loading and hashing, then the preprocess worker's decoding. A PIL image is hashed over its
    (RGB) pixels, which the processor then reads from the same copy of PIL's bytes."""
    if isinstance(source, Image.Image):
        image = convert_image(source)
        pixels = np.asarray(image)
        return image, pixels, hash_pil_image(image, pixels)
    data, mm_hash = load_image_bytes(source)  # type: ignore[arg-type]  # it names a bad type
    return decode_image(data), None, mm_hash


def _split_prompt(prompt: Prompt) -> tuple[str, list[ImageRef]]:
    if isinstance(prompt, str):
        return prompt, []
    if not isinstance(prompt, dict) or not isinstance(prompt.get("prompt"), str):
        raise InvalidRequest("a prompt is a string or a dict with a 'prompt' string")
    data = prompt.get("multi_modal_data") or {}
    unknown = set(data) - {"image"}
    if unknown:
        raise InvalidRequest(f"unsupported modalities {sorted(unknown)}; this model takes image")
    images = data.get("image", [])
    if not isinstance(images, list | tuple):
        images = [images]  # one item; _load_image names what is wrong with it, if anything
    return prompt["prompt"], list(images)


def _params_per_prompt(
    params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    if len(params) != num_prompts:
        raise InvalidRequest(f"{len(params)} sampling params for {num_prompts} prompts")
    return list(params)
