"""Structured output: a request's ``StructuredOutput`` spec -> an llguidance grammar, compiled
against the model's tokenizer, one matcher per sequence, and each step's token bitmask.

llguidance (the library vLLM's ``guidance`` backend and llama.cpp's ``%llguidance`` grammars
use) computes a token mask from the grammar state and the tokenizer's token trie in tens of
microseconds, with no per-grammar precompute, so a new schema costs nothing up front. Its
errors for a bad schema, regex or grammar come back from the compile here, while the request
is added, as ``InvalidRequestError`` with the library's message.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import llguidance
import torch

from engine_svc.core.request import Request
from protos.errors import InvalidRequestError
from protos.sampling import StructuredOutput

# Compiled grammars kept for reuse (the offline API checks a request before adding it, and
# clients repeat their schemas); a matcher per sequence is a deep copy of the cached one.
GRAMMAR_CACHE_SIZE = 64


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar for ``spec`` (not yet checked: the matcher does that)."""
    kind = spec.kind
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.json_schema)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        # Lark string literals take JSON's escapes, so json.dumps quotes any choice exactly.
        alternatives = " | ".join(json.dumps(c) for c in spec.choice)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    return llguidance.LLMatcher.grammar_from_lark(spec.grammar)


class GrammarCompiler:
    """Compiles specs against one tokenizer and hands out per-sequence matchers.

    ``vocab_size`` is the width of the model's logits (it may exceed the tokenizer's: padded
    embedding rows are never allowed); ``eos_token_ids`` are the tokens the mask allows once
    the grammar is satisfied.
    """

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._executor: llguidance.LLExecutor | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use (about 0.4 s for a 49k vocabulary): engines that never see a
        # constrained request never pay it.
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(
                self._tokenizer_json.read_text(), n_vocab=self.vocab_size, eos_token=self._eos
            )
        return self._tokenizer

    def compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """The compiled, unadvanced matcher for ``spec``; InvalidRequestError if it is bad."""
        cached = self._cache.get(spec)
        if cached is not None:
            self._cache.move_to_end(spec)
            return cached
        try:
            text = grammar_text(spec)
        except ValueError as e:  # grammar_from_json_schema: not a JSON object
            raise InvalidRequestError(f"bad {spec.kind}: {e}", param="structured_output") from None
        matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(
                f"bad {spec.kind}: {matcher.get_error()}", param="structured_output"
            )
        self._cache[spec] = matcher
        if len(self._cache) > GRAMMAR_CACHE_SIZE:
            self._cache.popitem(last=False)
        return matcher

    def matcher(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence (siblings of n > 1 each get their own)."""
        return self.compile(spec).deep_copy()

    def fill_bitmask(self, reqs: Sequence[Request]) -> tuple[torch.Tensor, dict[str, int]]:
        """The next-token bitmask of each request's matcher: int32 [len(reqs), ceil(V / 32)],
        bit ``t % 32`` of word ``t // 32`` set when token t is allowed, and each request id's
        row. Computed by llguidance's thread pool, without the GIL, so the engine runs it
        beside the forward pass."""
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        words = (self.vocab_size + 31) // 32
        bitmask = torch.empty((len(reqs), words), dtype=torch.int32)
        pairs = [(r.matcher, i) for i, r in enumerate(reqs)]
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), words * 4, len(reqs))
        return bitmask, {r.request_id: i for i, r in enumerate(reqs)}
