"""Sampler semantics: greedy, top-k/top-p support, seeds independent of the batch, logprobs."""

import pytest
import torch

from mm_runtime.gpu_worker.sampler import (
    Sampler,
    SamplingBatch,
    apply_top_k_top_p,
    make_generator,
)
from mm_runtime.shared.wire import SamplingParams

CPU = torch.device("cpu")


def _batch(
    params: list[SamplingParams], generators: list[torch.Generator | None] | None = None
) -> SamplingBatch:
    if generators is None:
        generators = [make_generator(p.seed, CPU) if p.seed is not None else None for p in params]
    return SamplingBatch.from_params(params, generators, CPU)


def _logits(n: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab_size, generator=make_generator(seed, CPU)) * 3  # [n, vocab]


def test_greedy_is_argmax() -> None:
    logits = _logits(8, 100)
    out = Sampler(seed=0)(logits, _batch([SamplingParams(temperature=0.0)] * 8))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None and out.logprob_token_ids is None


def test_greedy_ties_take_first_max() -> None:
    logits = torch.zeros(2, 10)
    logits[0, [3, 7]] = 5.0
    logits[1, [2, 4]] = 5.0
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=1)]
    out = Sampler(seed=0)(logits, _batch(params))
    assert out.token_ids.tolist() == [3, 2]


def test_greedy_accepts_half_precision_logits() -> None:
    logits = _logits(4, 50).to(torch.bfloat16)
    out = Sampler(seed=0)(logits, _batch([SamplingParams(temperature=0.0, logprobs=2)] * 4))
    assert torch.equal(out.token_ids, logits.float().argmax(dim=-1))
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0])
def test_top_k_1_is_greedy(temperature: float) -> None:
    logits = _logits(16, 200)
    sampler = Sampler(seed=0)
    batch = _batch([SamplingParams(temperature=temperature, top_k=1)] * 16)
    for _ in range(5):
        assert torch.equal(sampler(logits, batch).token_ids, logits.argmax(dim=-1))


def test_top_k_never_samples_outside_the_k_largest() -> None:
    vocab_size, k, num_rows = 20, 3, 4000
    row = _logits(1, vocab_size)  # [1, vocab]
    logits = row.expand(num_rows, -1)  # [num_rows, vocab]
    out = Sampler(seed=1)(logits, _batch([SamplingParams(temperature=2.0, top_k=k)] * num_rows))
    allowed = set(row[0].topk(k).indices.tolist())
    sampled = set(out.token_ids.tolist())
    assert sampled <= allowed
    assert sampled == allowed  # high temperature: every allowed token shows up in 4000 draws


def test_top_p_never_samples_outside_the_nucleus() -> None:
    # probs 0.5, 0.25, 0.125, ... : with p = 0.7 the nucleus is the first two tokens (mass 0.75).
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125])
    perm = torch.tensor([4, 0, 5, 2, 1, 3])  # shuffle so the nucleus is not a prefix of the vocab
    row = probs.log()[perm].unsqueeze(0)  # [1, vocab]
    num_rows = 4000
    logits = row.expand(num_rows, -1)
    out = Sampler(seed=2)(logits, _batch([SamplingParams(top_p=0.7)] * num_rows))
    nucleus = {int((perm == 0).nonzero()), int((perm == 1).nonzero())}
    assert set(out.token_ids.tolist()) == nucleus


def test_top_p_keeps_at_least_one_token() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    masked = apply_top_k_top_p(logits, None, torch.tensor([1e-6]))
    assert torch.isfinite(masked).tolist() == [[True, False, False, False]]


def test_top_k_then_top_p_on_the_renormalized_distribution() -> None:
    # After top-k=2 the two best tokens have mass 2/3 and 1/3: p = 0.6 keeps only the first.
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]]).log_softmax(-1)
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    masked = apply_top_k_top_p(probs.log(), torch.tensor([2]), torch.tensor([0.6]))
    assert torch.isfinite(masked).tolist() == [[True, False, False, False]]
    unmasked = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([1.0]))
    assert torch.equal(unmasked, logits)


def test_top_k_and_top_p_rows_mixed_in_one_batch() -> None:
    vocab_size, num_rows = 30, 3000
    row = _logits(1, vocab_size, seed=5)[0]
    logits = row.expand(num_rows, -1)
    params = [
        SamplingParams(temperature=1.5, top_k=4)
        if i % 3 == 0
        else SamplingParams(temperature=1.5, top_p=0.5)
        if i % 3 == 1
        else SamplingParams(temperature=1.5)
        for i in range(num_rows)
    ]
    out = Sampler(seed=3)(logits, _batch(params)).token_ids
    top4 = set(row.topk(4).indices.tolist())
    sorted_probs, sorted_ids = (row / 1.5).softmax(-1).sort(descending=True)
    nucleus_size = int((sorted_probs.cumsum(0) - sorted_probs < 0.5).sum())
    nucleus = set(sorted_ids[:nucleus_size].tolist())
    assert set(out[0::3].tolist()) <= top4
    assert set(out[1::3].tolist()) <= nucleus
    assert len(set(out[2::3].tolist())) > len(top4)  # the unfiltered rows range wider


def _sample_steps(
    sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], num_steps: int
) -> list[list[int]]:
    """Samples `num_steps` steps from fixed logits, reusing each seeded row's generator."""
    batch = _batch(params)
    return [sampler(logits, batch).token_ids.tolist() for _ in range(num_steps)]


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    vocab_size, num_steps = 1000, 6
    target_logits = _logits(1, vocab_size, seed=10)  # [1, vocab]
    target = SamplingParams(temperature=1.3, top_p=0.95, top_k=500, seed=1234)
    alone = [step[0] for step in _sample_steps(Sampler(0), target_logits, [target], num_steps)]
    assert len(set(alone)) > 1  # really random, not accidentally greedy

    for batch_size, position in [(2, 0), (5, 3), (9, 8)]:
        others = _logits(batch_size, vocab_size, seed=batch_size)
        logits = torch.cat([others[:position], target_logits, others[position + 1 :]])
        params = [
            SamplingParams(temperature=0.9, seed=99)
            if i % 2
            else SamplingParams(temperature=1.0, top_k=7)
            for i in range(batch_size)
        ]
        params[position] = target
        steps = _sample_steps(Sampler(seed=batch_size), logits, params, num_steps)
        assert [step[position] for step in steps] == alone


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    logits = _logits(1, 1000)
    params = [SamplingParams(seed=7)]
    first = _sample_steps(Sampler(0), logits, params, 8)
    again = _sample_steps(Sampler(1), logits, params, 8)
    other = _sample_steps(Sampler(0), logits, [SamplingParams(seed=8)], 8)
    assert first == again
    assert first != other


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = _logits(4, 1000)
    params = [SamplingParams()] * 4
    assert _sample_steps(Sampler(3), logits, params, 4) == _sample_steps(
        Sampler(3), logits, params, 4
    )


def test_mixed_greedy_random_and_seeded_rows() -> None:
    vocab_size = 500
    logits = _logits(6, vocab_size, seed=4)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=5),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, seed=6),  # greedy with a seed: still greedy
        SamplingParams(temperature=0.8, top_k=1),
        SamplingParams(temperature=1.0, seed=5),
    ]
    batch = _batch(params)
    assert not batch.all_greedy
    assert batch.generators[3] is None  # greedy rows never draw
    out = Sampler(seed=0)(logits, batch).token_ids
    argmax = logits.argmax(dim=-1)
    assert out[0] == argmax[0] and out[3] == argmax[3] and out[4] == argmax[4]

    alone_1 = Sampler(9)(logits[1:2], _batch([params[1]])).token_ids
    alone_5 = Sampler(9)(logits[5:6], _batch([params[5]])).token_ids
    assert out[1] == alone_1[0] and out[5] == alone_5[0]


def test_from_params_fields() -> None:
    params = [
        SamplingParams(temperature=0.0, top_k=5, logprobs=3),
        SamplingParams(temperature=0.5, top_p=0.9, logprobs=1),
        SamplingParams(temperature=1.0),
    ]
    batch = _batch(params)
    assert batch.temperature.tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert batch.top_p.tolist() == pytest.approx([1.0, 0.9, 1.0])
    assert batch.top_k.tolist() == [5, 0, 0] and batch.top_k.dtype == torch.int64
    assert batch.max_num_logprobs == 3
    assert not batch.all_greedy
    assert batch.no_top_k  # the only top_k is on a greedy row
    assert not batch.no_top_p
    assert _batch([SamplingParams()]).max_num_logprobs is None
    assert _batch([SamplingParams(temperature=0.0)] * 2).all_greedy


def test_logprobs_are_raw_log_softmax() -> None:
    vocab_size, k = 50, 5
    logits = _logits(4, vocab_size, seed=6)
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=2.0, top_p=0.5, logprobs=k),
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=1.0, seed=3, logprobs=0),
    ]
    out = Sampler(seed=0)(logits, _batch(params))
    assert out.logprobs is not None and out.logprob_token_ids is not None
    assert out.logprobs.shape == (4, 1 + k) and out.logprobs.dtype == torch.float32
    assert out.logprob_token_ids.shape == (4, 1 + k)
    assert out.logprob_token_ids.dtype == torch.int64

    expected = logits.log_softmax(dim=-1)  # raw: before temperature, top-k and top-p
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    sampled = expected.gather(1, out.token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.logprobs[:, 0], sampled)
    top_values, top_ids = expected.topk(k, dim=-1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top_ids)
    torch.testing.assert_close(out.logprobs[:, 1:], top_values)
    assert (out.logprobs[:, 1:].diff(dim=1) <= 0).all()  # best first

    wire = out.to_token_logprobs([p.logprobs for p in params])
    assert wire[2] is None
    assert wire[0] is not None and len(wire[0].top) == 2
    assert wire[0].sampled.token_id == int(out.token_ids[0])
    assert wire[0].top[0].token_id == wire[0].sampled.token_id  # greedy: sampled is the best
    assert wire[1] is not None and len(wire[1].top) == k
    assert wire[1].sampled.logprob == pytest.approx(float(sampled[1]))
    assert wire[3] is not None and wire[3].top == []


def test_logprobs_larger_than_vocab_are_clamped() -> None:
    logits = _logits(2, 4)
    out = Sampler(seed=0)(logits, _batch([SamplingParams(logprobs=10)] * 2))
    assert out.logprobs is not None and out.logprobs.shape == (2, 5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_distribution_matches_softmax(temperature: float) -> None:
    logits_row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    num_rows = 40_000
    logits = logits_row.expand(num_rows, -1)
    out = Sampler(seed=11)(logits, _batch([SamplingParams(temperature=temperature)] * num_rows))
    counts = torch.bincount(out.token_ids, minlength=6).double()  # [vocab]
    expected = (logits_row / temperature).softmax(-1).double() * num_rows
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30.0  # 5 degrees of freedom: p(chi2 > 30) ~ 1.5e-5


def test_seeded_distribution_matches_softmax() -> None:
    # One seeded row sampled many steps: the per-row generator path must also be a fair draw.
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    sampler = Sampler(seed=0)
    batch = _batch([SamplingParams(seed=42)])
    draws = torch.stack([sampler(logits, batch).token_ids[0] for _ in range(4000)])
    counts = torch.bincount(draws, minlength=4).double()
    expected = logits[0].softmax(-1).double() * 4000
    assert float(((counts - expected) ** 2 / expected).sum()) < 25.0


def test_shared_generator_follows_the_logits_device() -> None:
    sampler = Sampler(seed=0)
    sampler(_logits(2, 10), _batch([SamplingParams()] * 2))
    assert sampler._generator is not None and sampler._generator.device == CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_rows_on_cuda() -> None:
    device = torch.device("cuda")
    logits = _logits(3, 1000).to(device)
    params = [SamplingParams(seed=1), SamplingParams(), SamplingParams(temperature=0.0)]

    def run(rows: list[int]) -> torch.Tensor:
        gens = [make_generator(1, device) if params[r].seed else None for r in rows]
        batch = SamplingBatch.from_params([params[r] for r in rows], gens, device)
        return Sampler(seed=0)(logits[rows], batch).token_ids

    assert int(run([0, 1, 2])[0]) == int(run([2, 0])[1])
    assert int(run([1, 2, 0])[1]) == int(logits[2].argmax())
