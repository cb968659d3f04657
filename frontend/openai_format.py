"""OpenAI's response objects, laid out from the frontend's replies (frontend process, issue 6).

`http_api.py` turns one HTTP request into engine requests, one per choice, prompt by prompt
(`n` choices each); a `Shape` lays their replies out as OpenAI does, and vLLM's
`serving_chat.py` / `serving_completion.py`: a whole `chat.completion` / `text_completion`, or
the choice of one SSE chunk. Logprobs come in the chat API's shape (`logprobs.content`, a list
of {token, logprob, bytes, top_logprobs}) or the legacy completions one (parallel lists
`tokens`, `token_logprobs`, `top_logprobs` as token -> logprob dicts, `text_offset`).
"""

from transformers import PreTrainedTokenizerBase

from mm_runtime.frontend.detokenizer import IncrementalDetokenizer
from mm_runtime.shared.wire import Logprob, RequestDelta, TokenLogprobs

# Top logprobs a request may ask for per token (chat's top_logprobs, the legacy logprobs):
# OpenAI's limit and vLLM's default max_logprobs. Each costs a top-k over the vocabulary.
MAX_LOGPROBS = 20
# JSON has no -inf (json.dumps writes "-Infinity", which strict parsers refuse): a token the
# model rules out entirely gets vLLM's floor instead.
_MIN_LOGPROB = -9999.0


class Shape:
    """How one API lays out a whole response and each choice of a stream chunk. Choice `index`
    answers prompt `index // choices_per_prompt`: the prompts in order, each with its n."""

    object_name: str
    chunk_name: str

    def __init__(self, tokenizer: PreTrainedTokenizerBase, choices_per_prompt: int) -> None:
        self.tokenizer = tokenizer
        self.choices_per_prompt = choices_per_prompt

    def choice(self, index: int, delta: RequestDelta, first: bool) -> dict[str, object]:
        """One choice: a whole one (the final reply) or a stream chunk's (the step's delta)."""
        raise NotImplementedError

    def whole(self, head: dict[str, object], replies: list[RequestDelta]) -> dict[str, object]:
        return {
            **head,
            "object": self.object_name,
            "choices": [self.choice(i, r, first=True) for i, r in enumerate(replies)],
            "usage": self.usage(replies),
        }

    def usage(self, finals: list[RequestDelta]) -> dict[str, int]:
        """Each prompt counts once however many choices share it (as OpenAI's usage does)."""
        assert all(r.usage is not None for r in finals)  # the final replies carry it
        firsts = finals[:: self.choices_per_prompt]  # one choice of each prompt
        prompt = sum(r.usage.prompt_tokens for r in firsts)  # type: ignore[union-attr]
        completion = sum(r.usage.completion_tokens for r in finals)  # type: ignore[union-attr]
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def token_text(self, token_id: int) -> str:
        """One token on its own, as OpenAI lists it (a piece of a character decodes to U+FFFD)."""
        return self.tokenizer.decode([token_id])


class ChatShape(Shape):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        choices_per_prompt: int,
        with_logprobs: bool,
        streaming: bool,
    ) -> None:
        super().__init__(tokenizer, choices_per_prompt)
        self.with_logprobs = with_logprobs
        self.streaming = streaming  # chunks carry a "delta", whole responses a "message"

    def choice(self, index: int, delta: RequestDelta, first: bool) -> dict[str, object]:
        logprobs = None
        if self.with_logprobs:
            logprobs = {"content": [self._entry(e) for e in delta.logprobs or []]}
        content: dict[str, object] = {"content": delta.text}
        if first:
            content = {"role": "assistant"} | content
        key = "delta" if self.streaming else "message"
        return {
            "index": index,
            key: content,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
        }

    def _entry(self, entry: TokenLogprobs) -> dict[str, object]:
        return {**self._token(entry.sampled), "top_logprobs": [self._token(t) for t in entry.top]}

    def _token(self, lp: Logprob) -> dict[str, object]:
        text = self.token_text(lp.token_id)
        return {"token": text, "logprob": _finite(lp.logprob), "bytes": list(text.encode())}


class CompletionShape(Shape):
    object_name = "text_completion"
    chunk_name = "text_completion"

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, choices_per_prompt: int, with_logprobs: bool
    ) -> None:
        super().__init__(tokenizer, choices_per_prompt)
        self.with_logprobs = with_logprobs
        self._offsets: dict[int, TextOffsets] = {}  # choice index -> where its text has got to

    def choice(self, index: int, delta: RequestDelta, first: bool) -> dict[str, object]:
        logprobs = self._logprobs(index, delta.logprobs or []) if self.with_logprobs else None
        return {
            "index": index,
            "text": delta.text,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
        }

    def _logprobs(self, index: int, entries: list[TokenLogprobs]) -> dict[str, object]:
        """The legacy logprobs object of these tokens; a stream's chunks continue one another
        (their `text_offset`s count from the start of the choice's text)."""
        offsets = self._offsets.setdefault(index, TextOffsets(self.tokenizer))
        return {
            "tokens": [self.token_text(e.sampled.token_id) for e in entries],
            "token_logprobs": [_finite(e.sampled.logprob) for e in entries],
            "top_logprobs": [self._top(e) for e in entries],
            "text_offset": offsets.advance([e.sampled.token_id for e in entries]),
        }

    def _top(self, entry: TokenLogprobs) -> dict[str, float]:
        """The top N, best first, then the sampled token if it is not among them: OpenAI's
        legacy API always lists the chosen token, so up to N + 1 entries. Tokens that decode
        alike (pieces of characters: U+FFFD) share a key, which keeps the first, best one."""
        top: dict[str, float] = {}
        for lp in [*entry.top, entry.sampled]:
            top.setdefault(self.token_text(lp.token_id), _finite(lp.logprob))
        return top


class TextOffsets:
    """Where each output token starts in the choice's text, in characters.

    Counted on the text as the frontend emits it (`IncrementalDetokenizer`), not by adding up
    per-token strings: a character split over two byte-level tokens decodes to U+FFFD from each
    piece alone, which would shift every later offset (vLLM's sum drifts by one per split
    character in CJK text). So offset i is the length of what tokens 0..i-1 decode to, less a
    trailing character still incomplete: the pieces of a character all start where it does.
    Special tokens (skipped in the text) take no room.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, [], stop=[])
        self._num_chars = 0  # text emitted so far

    def advance(self, token_ids: list[int]) -> list[int]:
        offsets = []
        for token_id in token_ids:
            offsets.append(self._num_chars)
            self._num_chars += len(self._detokenizer.update([token_id]))
        return offsets


def _finite(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)
