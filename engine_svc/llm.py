"""Offline API shaped like vLLM's: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from tqdm import tqdm

from engine_svc.config import EngineConfig
from engine_svc.core.request import FinishReason, Request
from engine_svc.engine import LLMEngine
from engine_svc.models.detokenizer import IncrementalDetokenizer
from engine_svc.models.tokenizer import Tokenizer
from protos.errors import InvalidRequestError
from protos.sampling import SamplingParams


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
        detoks: dict[str, IncrementalDetokenizer] = {}  # by sequence id; none without tokenizer
        try:
            for i, (p, ids, sp) in enumerate(zip(prompts, encoded, params)):
                rid = f"offline-{next(self._ids)}"
                prio = priority[i] if priority else 0
                reqs = self.engine.add_request(rid, ids, sp, priority=prio)
                groups.append((rid, p, reqs))
                if self.tokenizer is not None:
                    detoks.update((r.request_id, self._detokenizer(ids, sp)) for r in reqs)
            self._run(groups, detoks, use_tqdm)
        except BaseException:
            self.engine.abort_request([rid for rid, _, _ in groups])
            raise
        return [self._output(rid, p, reqs, detoks) for rid, p, reqs in groups]

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

    def _detokenizer(self, prompt_ids: list[int], sp: SamplingParams) -> IncrementalDetokenizer:
        """The tokenizer workers' detokenizer: the same text and stop-string rules as served."""
        return IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids,
            skip_special_tokens=sp.skip_special_tokens,
            stop=sp.stop,
            include_stop_str_in_output=sp.include_stop_str_in_output,
            min_tokens=sp.min_tokens,
        )

    def _run(self, groups, detoks: dict[str, IncrementalDetokenizer], use_tqdm: bool) -> None:
        total = sum(len(reqs) for _, _, reqs in groups)
        with tqdm(total=total, desc="Generating", unit="seq", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for o in self.engine.step():
                    # With stop strings the text is needed as it comes, since a match stops
                    # the sequence; without, it is decoded once at the end (_completion): fed
                    # in one piece or token by token, the detokenizer gives the same text.
                    if o.request.params.stop and o.request_id in detoks:
                        detok = detoks[o.request_id]
                        detok.add(o.new_token_ids)
                        if detok.stopped:  # the engine must not go on (no-op if it finished)
                            self.engine.abort_request([o.request_id])
                    if o.request.is_finished:
                        bar.update(1)

    def _output(
        self,
        rid: str,
        prompt: PromptType,
        reqs: list[Request],
        detoks: dict[str, IncrementalDetokenizer],
    ) -> RequestOutput:
        outs = [self._completion(i, r, detoks.get(r.request_id)) for i, r in enumerate(reqs)]
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

    def _completion(
        self, index: int, r: Request, detok: IncrementalDetokenizer | None
    ) -> CompletionOutput:
        ids = list(r.output_token_ids)
        text, finish, stop_reason = "", r.finish_reason, r.stop_token_id
        if detok is not None:
            if rest := ids[detok.num_tokens :]:
                detok.add(rest)
            detok.finish()  # flushes held-back text, in which a stop string may still match
            text = detok.text
            if detok.stopped:  # wins over the engine's reason, as in the tokenizer workers
                finish, stop_reason = FinishReason.STOP_SEQUENCE, detok.matched_stop
        logprobs = None
        if r.params.logprobs is not None:
            logprobs = [_lp_dict(t, lp, top) for t, lp, top in zip(ids, r.logprobs, r.top_logprobs)]
        cum = sum(r.logprobs) if r.params.logprobs is not None else None
        reason = finish.value if finish else None
        return CompletionOutput(index, text, ids, reason, stop_reason, logprobs, cum)


def _with_stop_ids(sp: SamplingParams, ids: list[int]) -> SamplingParams:
    extra = [i for i in ids if i not in sp.stop_token_ids]
    return replace(sp, stop_token_ids=sp.stop_token_ids + extra) if extra else sp


def _lp_dict(token: int, lp: float, top: list[tuple[int, float]]) -> dict[int, float]:
    d = {t: v for t, v in top}
    d[token] = lp
    return d
