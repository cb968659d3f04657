"""Async scheduling: step N+1 is planned and queued before step N's tokens are applied, and
that never changes what a request outputs (the pending token's id comes from the device)."""

from pathlib import Path

import pytest
from mm_testing import mm_prompt, prompt_text, random_image

from mm_runtime import LLM, SamplingParams
from mm_runtime.gpu_worker.engine import EngineCore
from mm_runtime.gpu_worker.model_runner import StepResult
from mm_runtime.gpu_worker.scheduler import SchedulerOutput
from mm_runtime.shared.wire import EngineRequest

ARCH = "qwen2_vl"


@pytest.fixture(scope="module")
def llm(tiny_models: dict[str, Path]) -> LLM:
    return LLM(tiny_models[ARCH], device="cpu", block_size=4)


def request(llm: LLM, question: str, params: SamplingParams, image: bool = False) -> EngineRequest:
    images = [random_image(56, 56, seed=len(question))] if image else []
    return llm.build_request(mm_prompt(prompt_text(ARCH, question, len(images)), images), params)


def run(engine: EngineCore) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
    return tokens


def greedy(max_tokens: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kwargs)  # type: ignore[arg-type]


def test_next_step_is_queued_before_the_last_is_applied(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, events = llm.engine, []
    execute, wait = engine.runner.execute, StepResult.wait

    def recording_execute(sched: SchedulerOutput, *args: object) -> StepResult:
        result = execute(sched, *args)  # type: ignore[arg-type]
        events.append(("execute", id(result)))
        return result

    def recording_wait(result: StepResult) -> object:
        events.append(("wait", id(result)))
        return wait(result)

    monkeypatch.setattr(engine.runner, "execute", recording_execute)
    monkeypatch.setattr(StepResult, "wait", recording_wait)
    engine.add_request(request(llm, "Describe the weather today.", greedy(4)))
    outputs = [engine.step() for _ in range(3)]
    assert outputs[0] == []  # the first step's tokens come with the second call
    # execute(1), execute(2), wait(1), execute(3), wait(2): one step always queued ahead.
    kinds = [kind for kind, _ in events]
    assert kinds == ["execute", "execute", "wait", "execute", "wait"]
    assert events[2][1] == events[0][1] and events[4][1] == events[1][1]
    run(engine)


def test_a_length_limit_costs_no_extra_step(llm: LLM) -> None:
    engine = llm.engine
    samples: dict[str, int] = {}
    schedule = engine.scheduler.schedule

    def counting() -> SchedulerOutput:
        out = schedule()
        for s in out.scheduled:
            samples[s.req.req_id] = samples.get(s.req.req_id, 0) + s.samples
        return out

    engine.scheduler.schedule = counting  # type: ignore[method-assign]
    try:
        reqs = [request(llm, "hi", greedy(1)), request(llm, "Tell me more.", greedy(7))]
        for r in reqs:
            engine.add_request(r)
        tokens = run(engine)
    finally:
        del engine.scheduler.schedule
    assert {r.req_id: len(tokens[r.req_id]) for r in reqs} == {reqs[0].req_id: 1, reqs[1].req_id: 7}
    assert samples == {reqs[0].req_id: 1, reqs[1].req_id: 7}


def test_a_stop_found_one_step_late_drops_the_extra_token(llm: LLM) -> None:
    engine = llm.engine
    question = "What is in this image?"
    full = run_alone(llm, request(llm, question, greedy(12), image=True))
    beside = request(llm, "Describe the weather today.", greedy(12))
    expected_beside = run_alone(llm, beside)
    stop_at = full[4]
    stopping = request(llm, question, greedy(12, stop_token_ids=[stop_at]), image=True)
    beside = request(llm, "Describe the weather today.", greedy(12))
    engine.add_request(stopping)
    engine.add_request(beside)
    tokens = run(engine)
    assert tokens[stopping.req_id] == full[: full.index(stop_at) + 1]
    assert tokens[beside.req_id] == expected_beside
    assert engine.kv.num_free_blocks == engine.num_kv_blocks - 1  # the extra step's blocks too


def test_an_abort_while_a_step_is_in_flight(llm: LLM) -> None:
    engine = llm.engine
    kept = request(llm, "Describe the weather today.", greedy(10))
    expected = run_alone(llm, kept)
    kept = request(llm, "Describe the weather today.", greedy(10))
    aborted = request(llm, "What is in this image?", greedy(10), image=True)
    engine.add_request(kept)
    engine.add_request(aborted)
    seen: dict[str, list[int]] = {}
    for _ in range(3):  # prefill, then a decode queued behind it
        for out in engine.step():
            seen.setdefault(out.req_id, []).extend(out.new_token_ids)
    engine.abort_request(aborted.req_id)  # its token of the step in flight is dropped
    for req_id, new in run(engine).items():
        seen.setdefault(req_id, []).extend(new)
    assert seen[kept.req_id] == expected
    assert len(seen[aborted.req_id]) == 2  # applied before the abort, nothing after
    assert engine.kv.num_free_blocks == engine.num_kv_blocks - 1


def run_alone(llm: LLM, req: EngineRequest) -> list[int]:
    llm.engine.add_request(req)
    return run(llm.engine)[req.req_id]
