"""Incremental detokenization: one sequence's token ids in, UTF-8-safe text deltas out, stop
strings applied.

The one implementation of both, used by the tokenizer workers (the streamed deltas) and by the
offline `LLM` (its text and stop strings): a request gets the same text and finish reason from
either.

Two layers, each holding text back for its own reason:

- `_DecodeWindow` decodes a short window of recent tokens and releases only the new suffix,
  and only once it no longer ends in U+FFFD (a multi-byte character split across tokens).
  This is the prefix/read-offset scheme of HF's TextStreamer, vLLM and tokenizers'
  DecodeStream: the decoder sees a few already-emitted tokens as context, so SentencePiece
  word-boundary spaces come out right, and the cost per token is O(window), not O(sequence).
- `IncrementalDetokenizer` holds back any tail that could still grow into a stop string and
  cuts the text when one matches.

Pure Python on top of the tokenizer's `decode`; no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from protos.errors import InvalidRequestError

_REPLACEMENT = "\ufffd"

# Prompt tokens given to the decoder as context before the first output token: enough for a
# SentencePiece "▁" to decode as the space it is mid-text (it is stripped at the start of a
# decode), few enough to keep every decode call short. vLLM uses 5 as well.
_CONTEXT_TOKENS = 5


class TokenDecoder(Protocol):
    """What the detokenizer needs of `engine_svc.models.tokenizer.Tokenizer`."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class _DecodeWindow:
    """Token ids in, text out, never ending in a character whose bytes are still incomplete.

    Invariant: `_ids` is the window. `_ids[:_read]` was emitted already and is kept only as
    decoding context; it decodes to `_prefix_text`. The context makes the start of the new
    text come out exactly as it would in a decode of the whole sequence.
    """

    def __init__(
        self, tokenizer: TokenDecoder, prompt_ids: Sequence[int], skip_special_tokens: bool
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        context, prefix_text = self._prompt_context([int(t) for t in prompt_ids])
        self._ids = context
        self._read = len(context)
        self._prefix_text = prefix_text

    def _prompt_context(self, prompt: list[int]) -> tuple[list[int], str]:
        """The prompt's last few tokens, starting early enough not to cut a character.

        A window that starts inside a character decodes it as U+FFFD, and byte-fallback
        decoders turn the whole run of byte tokens it belongs to into U+FFFD, so a window
        ending in U+FFFD may only have started too late: start up to 3 tokens earlier (a
        character is at most 4 bytes). If it still ends in U+FFFD, the prompt itself ends
        mid-character, and the output is decoded on its own (its first bytes cannot
        complete a character that is half prompt).
        """
        for n in range(_CONTEXT_TOKENS, _CONTEXT_TOKENS + 4):
            context = prompt[max(len(prompt) - n, 0) :]
            text = self._decode(context)
            if not text.endswith(_REPLACEMENT):
                return context, text
            if n >= len(prompt):
                break
        return [], ""

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(int(t) for t in token_ids)
        return self._release(final=False)

    def flush(self) -> str:
        """Everything not yet emitted, a genuinely incomplete tail included (as U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        new_text = self._decode(self._ids)
        # Not longer: e.g. only skipped special tokens so far. Ending in U+FFFD: a
        # character's bytes are still arriving. Either way wait for more (the window grows).
        if len(new_text) <= len(self._prefix_text) or (
            new_text.endswith(_REPLACEMENT) and not final
        ):
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._advance()
        return delta

    def _advance(self) -> None:
        # The tokens just emitted become the next window's context; older ones are dropped
        # so both memory and decode cost stay O(window).
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, self._skip) if ids else ""


class IncrementalDetokenizer:
    """Turns one sequence's token ids into text deltas, UTF-8-safe, with stop strings.

    A stop string is honoured as soon as it is complete in the text decoded so far (the
    engine should stop generating at once), once ``min_tokens`` tokens are out (as in vLLM):
    a match counts only if it ends in text decoded from then on. Among the matches found by
    one `add()` the earliest start wins; at the same start, the longest stop string.
    """

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError("stop strings must be non-empty strings")
        self._window = _DecodeWindow(tokenizer, prompt_token_ids, skip_special_tokens)
        self._stops = tuple(stop)
        self._include_stop = include_stop_str_in_output
        self._held = ""  # decoded, not emitted: could be the start of a stop string
        self._parts: list[str] = []  # emitted deltas, joined lazily by `text`
        self._finished = False
        self._min_tokens = min_tokens
        self._num_tokens = 0
        self.stopped = False
        self.matched_stop: str | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens taken by `add()` (it takes none once a stop string has matched)."""
        return self._num_tokens

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the text that is safe to emit now ("" once stopped)."""
        if self._finished:
            raise RuntimeError("add() after finish()")
        if self.stopped:
            return ""
        self._num_tokens += len(token_ids)
        return self._emit(self._held + self._window.push(token_ids), final=False)

    def finish(self) -> str:
        """The sequence ended for another reason (EOS, length, abort): flush what is held.

        A stop string can still match here (in text held back by the UTF-8 layer), in which
        case `stopped` becomes True and the text is cut as in `add()`.
        """
        if self._finished or self.stopped:
            self._finished = True
            return ""
        self._finished = True
        return self._emit(self._held + self._window.flush(), final=True)

    def _emit(self, pending: str, final: bool) -> str:
        match = None
        if self._num_tokens >= self._min_tokens:
            # Held text never holds a match that counts: one must end in the new text.
            match = _earliest_stop(pending, self._stops, min_end=len(self._held) + 1)
        if match is not None:
            start, stop = match
            self.stopped, self.matched_stop = True, stop
            out, self._held = pending[: start + len(stop) if self._include_stop else start], ""
        else:
            keep = 0 if final else _stop_prefix_len(pending, self._stops)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        if out:
            self._parts.append(out)
        return out


def _earliest_stop(text: str, stops: Sequence[str], min_end: int = 0) -> tuple[int, str] | None:
    """The earliest stop string occurrence in `text` ending at or after `min_end` (ties: the
    longest), or None."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, max(0, min_end - len(s)))
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
            best = (i, s)
    return best


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string.

    That tail must be held back: the next tokens may complete the stop string. Anything
    before it can never be part of a match and is safe to emit.
    """
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest
