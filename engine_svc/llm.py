"""Offline API shaped like vLLM's: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from tqdm import tqdm

from engine_svc.config import EngineConfig
from engine_svc.engine import LLMEngine
from protos.errors import InvalidRequestError
from engine_svc.core.request import FinishReason, Request
from protos.sampling import SamplingParams
from engine_svc.models.tokenizer import Tokenizer


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "stop_sequence", "abort"
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None  # per token: {token id: logprob} (sampled + top-k)
    cumulative_logprob: float | None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    usage: Usage
    finished: bool = True
    metrics: dict[str, float] = field(default_factory=dict)


PromptType = str | Sequence[int]


class LLM:
    """Load a model once and run batches of prompts through the paged engine.

    ``model`` is an HF-format directory, a ``.gguf`` file, or None for the default model
    (SmolLM2-135M-Instruct, fetched and converted on first use). Other keyword arguments are
    ``EngineConfig`` fields (``dtype``, ``max_num_seqs``, ``kv_cache_memory``, ...).
    """

    def __init__(self, model: str | None = None, **engine_kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        path = self.engine.model_path
        self.tokenizer = Tokenizer(path) if path and (path / "tokenizer.json").is_file() else None
        self._ids = itertools.count()
        self._stop_seen: dict[str, int] = {}  # request id -> text length at its last check
        self._stop_at: dict[str, tuple[int, str]] = {}  # request id -> (text index, stop string)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results come back in the order of ``prompts``."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise InvalidRequestError(
                f"got {len(params)} sampling params for {len(prompts)} prompts"
            )
        # Validate and tokenize everything before queueing anything, so a bad prompt leaves
        # the engine untouched.
        encoded = [self._encode(p) for p in prompts]
        for ids, sp in zip(encoded, params):
            self._precheck(ids, sp)
        groups: list[tuple[str, PromptType, list[Request]]] = []
        try:
            for i, (p, ids, sp) in enumerate(zip(prompts, encoded, params)):
                rid = f"offline-{next(self._ids)}"
                prio = priority[i] if priority else 0
                groups.append((rid, p, self.engine.add_request(rid, ids, sp, priority=prio)))
            self._run(groups, use_tqdm)
        except BaseException:
            self.engine.abort_request([rid for rid, _, _ in groups])
            raise
        return [self._output(rid, p, reqs) for rid, p, reqs in groups]

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template and generate a reply."""
        tok = self._require_tokenizer()
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [tok.encode(tok.apply_chat_template(c), add_special_tokens=False) for c in convs]
        if sampling_params is None:
            sampling_params = SamplingParams()
        # The template's end-of-turn token ends the reply even when it is not the model's EOS.
        end_ids = tok.chat_stop_token_ids()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = _with_stop_ids(sampling_params, end_ids)
        else:
            sampling_params = [_with_stop_ids(sp, end_ids) for sp in sampling_params]
        return self.generate(prompts, sampling_params, use_tqdm)

    # -- internals ---------------------------------------------------------------------------
    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InvalidRequestError(
                "this engine has no tokenizer (dummy weights): pass token ids"
            )
        return self.tokenizer

    def _encode(self, prompt: PromptType) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return self._require_tokenizer().encode(prompt)
        if not isinstance(prompt, Sequence) and not hasattr(prompt, "tolist"):
            raise InvalidRequestError("a prompt must be a string or a list of token ids (ints)")
        return list(prompt)

    def _precheck(self, ids: list[int], sp: SamplingParams) -> None:
        if not isinstance(sp, SamplingParams):
            raise InvalidRequestError("sampling_params must be SamplingParams")
        if sp.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer")
        self.engine.validate_request(ids, sp)

    def _run(self, groups, use_tqdm: bool) -> None:
        total = sum(len(reqs) for _, _, reqs in groups)
        with tqdm(total=total, desc="Generating", unit="seq", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                outs = self.engine.step()
                for o in outs:
                    req = o.request
                    if req.params.stop and req.finish_reason in (None, FinishReason.LENGTH):
                        self._check_stop_strings(req)  # the last token's text counts too
                    if o.request.is_finished:
                        bar.update(1)

    def _check_stop_strings(self, req: Request) -> None:
        """Once ``min_tokens`` are out, a stop string found in the text the newest token
        added (or reaching into it) ends the sequence, as in vLLM."""
        tok = self._require_tokenizer()
        rid = req.request_id
        text = tok.decode(req.output_token_ids, req.params.skip_special_tokens)
        seen = self._stop_seen.get(rid, 0)
        # A character split across tokens decodes as U+FFFD until its last byte comes: that
        # tail is not seen yet (the next token's text replaces it).
        self._stop_seen[rid] = len(text.rstrip("\ufffd"))
        if len(req.output_token_ids) < req.params.min_tokens:
            return
        # Only a match that ends in the new text: earlier ones were there before min_tokens.
        found = [
            (i, st)
            for st in req.params.stop
            if (i := text.find(st, max(0, seen - len(st) + 1))) >= 0
        ]
        if found:
            self.engine.abort_request([rid])  # nothing to do when it had just finished
            req.finish_reason = FinishReason.STOP_SEQUENCE
            self._stop_at[rid] = min(found, key=lambda m: (m[0], -len(m[1])))  # ties: longest

    def _output(self, rid: str, prompt: PromptType, reqs: list[Request]) -> RequestOutput:
        outs = [self._completion(i, r) for i, r in enumerate(reqs)]
        first = reqs[0]
        plp = None
        if first.params.prompt_logprobs is not None:
            plp = [
                None if lp is None else _lp_dict(tok, lp, top)
                for tok, lp, top in zip(
                    first.prompt_token_ids, first.prompt_logprobs, first.prompt_top_logprobs
                )
            ]
        usage = Usage(
            prompt_tokens=first.num_prompt_tokens,
            completion_tokens=sum(len(r.output_token_ids) for r in reqs),
            cached_tokens=sum(max(r.num_cached_tokens, 0) for r in reqs),
        )
        return RequestOutput(
            request_id=rid,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=list(first.prompt_token_ids),
            prompt_logprobs=plp,
            outputs=outs,
            usage=usage,
        )

    def _completion(self, index: int, r: Request) -> CompletionOutput:
        ids = list(r.output_token_ids)
        text, stop_reason = "", r.stop_token_id
        if self.tokenizer is not None:
            text = self.tokenizer.decode(ids, r.params.skip_special_tokens)
            at = self._stop_at.pop(r.request_id, None)
            if r.finish_reason is FinishReason.STOP_SEQUENCE and at is not None:
                i, stop_reason = at
                text = (
                    text[: i + len(stop_reason)]
                    if r.params.include_stop_str_in_output
                    else text[:i]
                )
        self._stop_seen.pop(r.request_id, None)
        logprobs = None
        if r.params.logprobs is not None:
            logprobs = [_lp_dict(t, lp, top) for t, lp, top in zip(ids, r.logprobs, r.top_logprobs)]
        cum = sum(r.logprobs) if r.params.logprobs is not None else None
        reason = r.finish_reason.value if r.finish_reason else None
        return CompletionOutput(index, text, ids, reason, stop_reason, logprobs, cum)


def _with_stop_ids(sp: SamplingParams, ids: list[int]) -> SamplingParams:
    extra = [i for i in ids if i not in sp.stop_token_ids]
    return replace(sp, stop_token_ids=sp.stop_token_ids + extra) if extra else sp


def _lp_dict(token: int, lp: float, top: list[tuple[int, float]]) -> dict[int, float]:
    d = {t: v for t, v in top}
    d[token] = lp
    return d
