"""Token sampling for one GPU worker step: greedy, temperature, top-k, top-p, seeds, logprobs.

Follows vLLM's V1 sampler (`vllm/v1/sample/sampler.py`, `ops/topk_topp_sampler.py`):
- greedy rows take the argmax of the raw logits; random rows divide by their temperature, mask with
  top-k then top-p, and sample with the "exponential race" `argmax(probs / q)`, `q ~ Exp(1)`, which
  is exactly a categorical draw from `probs` and lets greedy and random rows share one batch;
- a seeded row draws its `q` from its own generator, so its tokens depend only on its logits, its
  params and its generator state, never on the other rows of the batch or on its position;
- logprobs are vLLM's default `raw_logprobs`: log_softmax of the logits before any processing.
"""

from dataclasses import dataclass

import torch

from mm_runtime.shared.wire import Logprob, SamplingParams, TokenLogprobs

# Temperatures below this are greedy: dividing by them overflows float32 (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator seeded with `seed`, on `device` (it must live where the logits do)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass(slots=True)
class SamplingBatch:
    """The sampling parameters of one step, one row per request that samples this step.

    Built once per step by the model runner, in the same row order as the logits.
    """

    temperature: torch.Tensor  # [n] float32; rows below SAMPLING_EPS are greedy
    top_p: torch.Tensor  # [n] float32; 1.0 = off
    top_k: torch.Tensor  # [n] int64; 0 = off
    # Per-row generator for seeded random rows; None = draw from the sampler's shared generator.
    generators: list[torch.Generator | None]
    all_greedy: bool
    max_num_logprobs: int | None  # max over rows of SamplingParams.logprobs; None: no row wants any
    # Derived from the params so the hot path can skip the vocab sort without a device sync.
    # False is always safe (rows with top_k 0 / top_p 1.0 are left untouched by the masks).
    no_top_k: bool = False
    no_top_p: bool = False

    @classmethod
    def from_params(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        device: torch.device,
    ) -> "SamplingBatch":
        assert len(params) == len(generators)
        greedy = [p.temperature < SAMPLING_EPS for p in params]
        nums = [p.logprobs for p in params if p.logprobs is not None]
        floats = torch.tensor([[p.temperature for p in params], [p.top_p for p in params]])
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)
        if device.type == "cuda":
            # From pinned memory the copies are queued; from pageable memory each would wait
            # for every kernel queued before it (the step's forward, under async scheduling).
            floats = floats.pin_memory().to(device, non_blocking=True)
            top_k = top_k.pin_memory().to(device, non_blocking=True)
        return cls(
            temperature=floats[0],
            top_p=floats[1],
            top_k=top_k,
            # Greedy rows never draw, so a seeded greedy request's generator is left untouched.
            generators=[None if g else gen for g, gen in zip(greedy, generators, strict=True)],
            all_greedy=all(greedy),
            max_num_logprobs=max(nums) if nums else None,
            no_top_k=all(p.top_k <= 0 or g for p, g in zip(params, greedy, strict=True)),
            no_top_p=all(p.top_p >= 1.0 or g for p, g in zip(params, greedy, strict=True)),
        )


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [n] int64
    # Column 0: the sampled token; columns 1..k: the top-k tokens by logprob, best first.
    logprobs: torch.Tensor | None  # [n, 1 + k] float32, k = max_num_logprobs
    logprob_token_ids: torch.Tensor | None  # [n, 1 + k] int64

    def to_host(self) -> "SamplerOutput":
        """The same tensors on the host. From CUDA: copies into pinned memory, queued behind the
        step without waiting for it (the caller records an event and waits on that)."""
        if self.token_ids.device.type == "cpu":
            return self

        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return out.copy_(t, non_blocking=True)

        token_ids = host(self.token_ids)
        assert token_ids is not None
        return SamplerOutput(token_ids, host(self.logprobs), host(self.logprob_token_ids))

    def to_token_logprobs(self, num_logprobs: list[int | None]) -> list[TokenLogprobs | None]:
        """Per-row wire structs, each row cut to the number of top logprobs it asked for."""
        if self.logprobs is None or self.logprob_token_ids is None:
            return [None] * len(num_logprobs)
        values = self.logprobs.tolist()  # one device->host copy for the whole batch
        ids = self.logprob_token_ids.tolist()
        out: list[TokenLogprobs | None] = []
        for row, num in enumerate(num_logprobs):
            if num is None:
                out.append(None)
                continue
            lps = [Logprob(t, lp) for t, lp in zip(ids[row], values[row], strict=True)]
            out.append(TokenLogprobs(sampled=lps[0], top=lps[1 : 1 + num]))
        return out


class Sampler:
    """Samples one token per row. Holds the shared generator used by unseeded random rows."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        # Created on first use, on the logits' device (not known before the first step).
        self._generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()  # [n, vocab]; never modified in place below
        greedy_ids = logits.argmax(dim=-1)  # [n]
        if batch.all_greedy:
            token_ids = greedy_ids
        else:
            random_ids = self._random_sample(logits, batch)  # [n]
            token_ids = torch.where(batch.temperature < SAMPLING_EPS, greedy_ids, random_ids)
        if batch.max_num_logprobs is None:
            return SamplerOutput(token_ids, None, None)
        logprobs, logprob_token_ids = gather_logprobs(logits, token_ids, batch.max_num_logprobs)
        return SamplerOutput(token_ids, logprobs, logprob_token_ids)

    def _random_sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        # Greedy rows divide by 1: their random draw is discarded by the caller's torch.where.
        temperature = torch.where(batch.temperature < SAMPLING_EPS, 1.0, batch.temperature)
        logits = logits / temperature.unsqueeze(1)  # [n, vocab]
        top_k = None if batch.no_top_k else batch.top_k
        top_p = None if batch.no_top_p else batch.top_p
        if top_k is not None or top_p is not None:
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=-1)  # [n, vocab]; masked tokens have probability 0
        q = self._exponential(probs, batch.generators)  # [n, vocab]
        return probs.div_(q).argmax(dim=-1)  # [n]

    def _exponential(
        self, probs: torch.Tensor, generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        q = torch.empty_like(probs)  # [n, vocab]
        if any(g is None for g in generators):
            q.exponential_(generator=self._shared_generator(probs.device))
        # The one per-row loop: a seeded row's draw must come from its own generator alone.
        for row, generator in enumerate(generators):
            if generator is not None:
                q[row].exponential_(generator=generator)
        # exponential_ can return exactly 0 (u = 0 on CPU); 0/0 would be NaN, which argmax picks.
        return q.clamp_(min=torch.finfo(q.dtype).tiny)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = make_generator(self.seed, device)
        return self._generator


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Sets to -inf every logit outside each row's top-k, then outside its top-p nucleus.

    top-k keeps exactly k tokens (ties go to the lower token id, as argmax does, so top_k=1 is
    greedy); top-p keeps the smallest prefix of the sorted, top-k-renormalized distribution whose
    mass reaches p, always at least one token. Rows with top_k 0 or top_p 1.0 are left as they are.
    """
    vocab_size = logits.shape[-1]
    # Stable descending sort: equal logits keep id order, so position 0 is argmax's token.
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)  # [n, vocab]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab_size).clamp_(max=vocab_size)  # [n]
        positions = torch.arange(vocab_size, device=logits.device)  # [vocab]
        sorted_logits.masked_fill_(positions >= k.unsqueeze(1), float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)  # [n, vocab]
        mass_before = probs.cumsum(dim=-1) - probs  # [n, vocab]: mass of the better tokens
        # A token is dropped once the better ones already reach p. Rows with p = 1 are skipped
        # explicitly: float32 cumsum can reach 1.0 early and would cut their tail.
        drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)  # [n, vocab]
        drop[:, 0] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)  # [n, vocab]


def gather_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logprobs (before temperature/top-k/top-p) of the sampled token and the top tokens."""
    logprobs = logits.log_softmax(dim=-1)  # [n, vocab]
    sampled = logprobs.gather(1, token_ids.unsqueeze(1))  # [n, 1]
    top_logprobs, top_ids = logprobs.topk(min(num_logprobs, logprobs.shape[-1]), dim=-1)  # [n, k]
    return (
        torch.cat([sampled, top_logprobs], dim=1),  # [n, 1 + k]
        torch.cat([token_ids.unsqueeze(1), top_ids], dim=1),  # [n, 1 + k]
    )
