"""Incremental detokenization: deltas add up to the full decode; stop strings cut, never retract."""

import random

import pytest
from transformers import PreTrainedTokenizerBase

from mm_runtime.frontend.detokenizer import IncrementalDetokenizer

TEXT = "héllo wörld 日本語 🙂"
PROMPT = [5, 6, 7]


def _stream(
    detok: IncrementalDetokenizer,
    token_ids: list[int],
    chunk_size: int = 1,
    finish: bool = True,
) -> list[str]:
    """Feeds `token_ids` in chunks, checking that emitted text only ever grows by the deltas."""
    deltas = []
    for start in range(0, len(token_ids), chunk_size):
        last = start + chunk_size >= len(token_ids)
        before = detok.output_text
        delta = detok.update(token_ids[start : start + chunk_size], finished=finish and last)
        assert detok.output_text == before + delta
        deltas.append(delta)
    return deltas


def _detok(
    tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None, skip: bool = True
) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tokenizer, PROMPT, stop or [], skip_special_tokens=skip)


def test_tokenizer_splits_multibyte_characters(tokenizer: PreTrainedTokenizerBase) -> None:
    # Precondition of the tests below: some tokens alone are incomplete UTF-8.
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_multibyte_characters_are_never_emitted_broken(
    tokenizer: PreTrainedTokenizerBase, chunk_size: int
) -> None:
    ids = tokenizer.encode(TEXT + " naïve café Über 東京 🙃!")
    detok = _detok(tokenizer)
    deltas = _stream(detok, ids, chunk_size)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.output_text == tokenizer.decode(ids)
    assert not detok.stopped


def test_incomplete_character_is_held_until_complete(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("a🙂")
    detok = _detok(tokenizer)
    deltas = [detok.update([i]) for i in ids]
    assert "".join(deltas) == "a🙂"
    assert deltas[-1].endswith("🙂")
    assert "" in deltas  # at least one step waited for the rest of the emoji


def test_random_token_sequences_match_full_decode(tokenizer: PreTrainedTokenizerBase) -> None:
    rng = random.Random(0)
    vocab_size = len(tokenizer)
    for trial in range(200):
        ids = [rng.randrange(vocab_size) for _ in range(rng.randrange(1, 40))]
        skip = trial % 2 == 0
        detok = _detok(tokenizer, skip=skip)
        deltas = _stream(detok, ids, chunk_size=rng.randrange(1, 4))
        expected = tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == detok.output_text == expected


def test_unfinished_stream_emits_a_prefix(tokenizer: PreTrainedTokenizerBase) -> None:
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        detok = _detok(tokenizer)
        _stream(detok, ids, finish=False)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert full.startswith(detok.output_text)
        held_back = full[len(detok.output_text) :]
        assert held_back == "" or held_back.endswith("\ufffd")  # only incomplete UTF-8 waits
        assert detok.update([], finished=True) == held_back
        assert detok.output_text == full


def test_decodes_a_small_window_per_step(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = tokenizer.encode(TEXT * 50)
    window_sizes = []
    decode = tokenizer.decode

    def recording_decode(token_ids: list[int], **kwargs: bool) -> str:
        window_sizes.append(len(token_ids))
        return decode(token_ids, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", recording_decode)
    detok = _detok(tokenizer)
    _stream(detok, ids)
    monkeypatch.undo()
    assert detok.output_text == tokenizer.decode(ids)
    assert max(window_sizes) <= 8  # O(1) per token, however long the output


def test_stop_string_spanning_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode(TEXT)
    detok = _detok(tokenizer, stop=["wörld"])
    seen = []
    for i in ids:
        detok.update([i])
        seen.append(detok.output_text)
        if detok.stopped:
            break
    assert detok.stopped
    assert detok.output_text == "héllo "
    assert all("héllo ".startswith(text) for text in seen)  # "w", "wö"... never shown
    assert detok.update(tokenizer.encode(" more")) == ""  # nothing after a stop


def test_stop_string_of_a_single_token(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("the quick brown fox")
    token_texts = [tokenizer.decode([i]) for i in ids]
    stop = next(t for t in token_texts[1:] if len(t) > 1)  # a whole multi-char token
    detok = _detok(tokenizer, stop=[stop])
    _stream(detok, ids, finish=False)
    assert detok.stopped
    text = tokenizer.decode(ids)
    assert detok.output_text == text[: text.index(stop)]


def test_stop_string_at_the_very_start(tokenizer: PreTrainedTokenizerBase) -> None:
    detok = _detok(tokenizer, stop=["hé"])
    deltas = _stream(detok, tokenizer.encode(TEXT), finish=False)
    assert detok.stopped
    assert detok.output_text == "" and all(d == "" for d in deltas)


def test_earliest_stop_string_wins(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode(TEXT)
    detok = _detok(tokenizer, stop=["🙂", "日本", "ld 日", "wör"])
    _stream(detok, ids, chunk_size=len(ids), finish=False)  # all at once: every stop is present
    assert detok.stopped
    assert detok.output_text == "héllo "


def test_stop_string_inside_a_multibyte_character_run(tokenizer: PreTrainedTokenizerBase) -> None:
    detok = _detok(tokenizer, stop=["本"])
    _stream(detok, tokenizer.encode(TEXT), finish=False)
    assert detok.output_text == "héllo wörld 日"


def test_partial_stop_match_is_held_then_released(tokenizer: PreTrainedTokenizerBase) -> None:
    detok = _detok(tokenizer, stop=["help me"])
    _stream(detok, tokenizer.encode("say hel"), finish=False)
    assert detok.output_text == "say "  # "hel" may start "help me"
    detok.update(tokenizer.encode("lo"))
    assert detok.output_text == "say hello"
    _stream(detok, tokenizer.encode(" help"), finish=False)
    assert detok.output_text == "say hello "
    assert detok.update([], finished=True) == "help"  # the request ended: no stop after all
    assert detok.output_text == "say hello help" and not detok.stopped


def test_no_stop_hit_equals_decode(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode(TEXT)
    detok = _detok(tokenizer, stop=["xyz", "🙃", ""])
    _stream(detok, ids)
    assert detok.output_text == tokenizer.decode(ids) and not detok.stopped


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer: PreTrainedTokenizerBase, skip: bool) -> None:
    eos, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    text_ids = tokenizer.encode(TEXT)
    ids = [im_end, *text_ids[:4], im_end, im_end, *text_ids[4:], eos]
    detok = _detok(tokenizer, skip=skip)
    _stream(detok, ids)
    assert detok.output_text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in detok.output_text) is not skip


def test_stop_string_matching_a_special_token(tokenizer: PreTrainedTokenizerBase) -> None:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*tokenizer.encode("hi there"), im_end, *tokenizer.encode(" tail")]
    detok = _detok(tokenizer, stop=["<|im_end|>"], skip=False)
    _stream(detok, ids)
    assert detok.stopped and detok.output_text == "hi there"
