"""Incremental detokenization with stop strings, run by the frontend for each streaming request.

Follows vLLM's `detokenize_incrementally` (`vllm/transformers_utils/detokenizer_utils.py`): each
step decodes only the window `token_ids[prefix_offset:]` and emits what it adds to the decode of
`token_ids[prefix_offset:read_offset]`. The previous chunk as left context keeps decoders that
treat the first token specially (SentencePiece's leading-space strip) consistent with one full
decode, and the window makes the cost per token O(1) instead of re-decoding the whole output.
Stop strings follow vLLM's `check_stop_strings`, with the earliest match winning.
"""

from transformers import PreTrainedTokenizerBase

# What the byte-level and SentencePiece decoders put where a UTF-8 sequence is incomplete.
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, holding back what may still change.

    Invariants:
    - `output_text` is the concatenation of every delta returned; nothing emitted is ever retracted.
    - A character split across tokens is held back until complete (never emitted as U+FFFD), and so
      is a suffix of the text that is a prefix of a stop string, until it is resolved.
    - Once finished (`update(..., finished=True)`, or a stop string hit), `output_text` equals
      `tokenizer.decode(output_ids, skip_special_tokens=...)` cut before the earliest stop string.

    The prompt is not used as decode context (vLLM primes the window with its last tokens): that
    would make the text differ from the decode of the output ids alone, e.g. keep a leading space
    that SentencePiece strips from a first token. Byte-level BPE decodes the same either way.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]  # an empty stop string would stop before any text
        self.skip_special_tokens = skip_special_tokens
        self._token_ids: list[int] = []  # output tokens only (see the class docstring)
        # token_ids[prefix_offset:read_offset] is the context already emitted from; text of
        # token_ids[read_offset:] is not yet confirmed (e.g. ends in an incomplete character).
        self._prefix_offset = 0
        self._read_offset = 0
        self._pending = ""  # confirmed text not yet emitted: may start a stop string
        self._output_parts: list[str] = []  # the deltas returned so far
        self._stopped = False

    @property
    def output_text(self) -> str:
        return "".join(self._output_parts)

    @property
    def stopped(self) -> bool:
        """A stop string was hit: the caller finishes the request with finish_reason "stop"."""
        return self._stopped

    def update(self, new_token_ids: list[int], finished: bool = False) -> str:
        """Adds the step's new tokens and returns the new text delta (may be "").

        `finished`: the request ends with these tokens (EOS, stop token, length), so whatever is
        held back (a partial stop-string match, an incomplete trailing character) is released.
        """
        if self._stopped:
            return ""
        for token_id in new_token_ids:
            self._token_ids.append(token_id)
            self._pending += self._decode_window(flush=False)
        if finished:
            self._pending += self._decode_window(flush=True)
        return self._emit(finished)

    def _decode_window(self, flush: bool) -> str:
        """The text the unread tokens add; "" while it would end in an incomplete character."""
        if self._read_offset == len(self._token_ids):
            return ""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        if not flush and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""  # nothing new yet (a skipped special token) or a character still incomplete
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return new_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, finished: bool) -> str:
        """Moves the resolved part of `_pending` into the output and returns it."""
        stop_index = self._find_stop()
        if stop_index is not None:
            self._stopped = True
            end = stop_index
        elif finished:
            end = len(self._pending)
        else:
            end = len(self._pending) - self._partial_stop_len()
        delta = self._pending[:end]
        self._pending = "" if self._stopped else self._pending[end:]
        if delta:
            self._output_parts.append(delta)
        return delta

    def _find_stop(self) -> int | None:
        """Start of the earliest stop string in `_pending`.

        Searching `_pending` alone is enough: everything emitted was checked, and what was held
        back is the longest suffix that starts a stop string, so no match can begin before it.
        """
        found = [i for s in self.stop if (i := self._pending.find(s)) >= 0]
        return min(found) if found else None

    def _partial_stop_len(self) -> int:
        """Length of the longest suffix of `_pending` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest
