"""The engine core: requests in, one step at a time, token deltas out. No IO here."""

from __future__ import annotations

import itertools
import logging
import operator
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine_svc.config import (
    DEFAULT_KV_CACHE_MEMORY,
    EngineConfig,
    resolve_device,
    resolve_dtype,
    resolve_kv_cache_dtype,
)
from engine_svc.core.block_manager import BlockManager
from engine_svc.core.request import FinishReason, Request
from engine_svc.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine_svc.models.config import ModelConfig
from engine_svc.models.loader import dummy_model, load_model
from engine_svc.runner.cpu import ModelRunner, RunnerOutput
from engine_svc.sampler import Sampler, SamplingRow, TokenMask
from engine_svc.structured import GrammarCompiler
from engine_svc.threads import ThreadGovernor, affinity_cores, read_sample
from protos.errors import ContextLengthError, InvalidRequestError, QueueFullError
from protos.sampling import MAX_N, SamplingParams

log = logging.getLogger("pagedserve.engine")


@dataclass(slots=True)
class StepOutput:
    """What one step produced for one sequence (a delta: only this step's tokens)."""

    request_id: str  # the sequence's id (parent id + "#i" for n > 1 siblings)
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    request: Request = field(repr=False)


@dataclass(slots=True)
class StepStats:
    num_seqs: int = 0
    num_tokens: int = 0
    num_preempted: int = 0


def resolve_model_path(model: str | None, progress: bool) -> Path:
    path = None if model is None else Path(model).expanduser()
    if path is None or path.suffix == ".gguf":
        from engine_svc.models import (
            fetch as model_fetch,  # imports gguf: not needed for an HF directory
        )

        if path is None:
            return model_fetch.fetch_default_model(progress=progress)
        return model_fetch.convert_gguf_cached(path, progress=progress)
    if not path.exists():
        raise InvalidRequestError(f"model path {path} does not exist")
    return path


def _make_cuda_runner(model, cfg: ModelConfig, dtype: torch.dtype, config: EngineConfig, device):
    from engine_svc.runner.cuda import CudaModelRunner  # imports triton

    return CudaModelRunner(
        model,
        cfg,
        dtype,
        config.block_size,
        config.max_num_seqs,
        config.max_num_batched_tokens,
        config.gpu_memory_utilization,
        config.enforce_eager,
        device,
    )


class LLMEngine:
    def __init__(self, config: EngineConfig, model_config: ModelConfig | None = None) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        # CPU threads that follow what other work leaves of the cores (engine_svc.threads),
        # unless --num-threads fixed them.
        self.thread_governor = None
        if self.device.type == "cpu" and not config.num_threads:
            cores = affinity_cores()
            self.thread_governor = ThreadGovernor(
                torch.get_num_threads(),
                len(cores),
                torch.set_num_threads,
                lambda: read_sample(cores),
            )
            self.thread_governor.tick()  # the first look: the first step compares with it
        if model_config is None:
            self.model_path = resolve_model_path(config.model, config.progress)
            model_config = ModelConfig.from_dir(self.model_path)
        else:  # a config given directly (tests, benchmarks): weights must be dummy
            self.model_path = None
        self.model_config = model_config
        mpe = model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > mpe:
            # Positions past the model's own have no rotary entry, nor a trained meaning.
            raise InvalidRequestError(
                f"max_model_len {config.max_model_len} exceeds the model's context of {mpe} tokens"
            )
        if config.load_format == "dummy" or self.model_path is None:
            model = dummy_model(model_config, self.dtype, config.seed, self.device)
        else:
            model = load_model(self.model_path, model_config, self.dtype, config.progress)
        mc = self.model_config
        max_len = config.max_model_len or mc.max_position_embeddings
        cuda_runner = None
        if self.device.type == "cuda":
            if config.quantization is not None:
                raise InvalidRequestError(
                    f"--quantization {config.quantization} runs on the CPU engine only; "
                    "the CUDA engine serves the weights in --dtype"
                )
            if config.kv_cache_dtype != "auto":
                raise InvalidRequestError(
                    f"--kv-cache-dtype {config.kv_cache_dtype} runs on the CPU engine only so "
                    "far; the CUDA engine keeps the KV cache in --dtype"
                )
            cuda_runner = _make_cuda_runner(model, mc, self.dtype, config, self.device)
            if config.kv_cache_memory is not None and config.num_kv_blocks is None:
                log.warning(
                    "--kv-cache-memory applies to the CPU engine; on CUDA the KV cache takes "
                    "what --gpu-memory-utilization leaves"
                )
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        elif cuda_runner is not None:
            num_blocks = cuda_runner.profile_num_blocks()
        else:
            budget = config.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
            kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
            num_blocks = budget // (mc.kv_bytes_per_token(kv_dtype) * config.block_size)
        capacity = num_blocks * config.block_size
        if capacity < max_len:
            log.warning(
                "KV cache holds %d tokens < max_model_len %d: lowering it", capacity, max_len
            )
            max_len = capacity
        if max_len < 2:
            raise InvalidRequestError("the KV cache budget is too small for even one request")
        self.max_model_len = max_len
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=max(config.max_num_batched_tokens, 1),
                max_waiting=config.max_waiting,
                max_model_len=max_len,
                long_prefill_chunk=config.long_prefill_chunk,
                context_cost=mc.attention_cost_per_context_token(),
            ),
            self.block_manager,
        )
        if cuda_runner is not None:
            cuda_runner.init_kv_cache(num_blocks, max_len)
            self.runner = cuda_runner
        else:
            self.runner = ModelRunner(
                model,
                mc,
                self.dtype,
                num_blocks,
                config.block_size,
                max_len,
                config.quantization,
                resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype),
            )
        self.sampler = Sampler()
        # Structured output needs the tokenizer's vocabulary (none with dummy weights).
        self.grammars: GrammarCompiler | None = None
        if self.model_path is not None and (self.model_path / "tokenizer.json").is_file():
            self.grammars = GrammarCompiler(
                self.model_path / "tokenizer.json", mc.vocab_size, mc.eos_token_ids
            )
        # One thread computes a step's grammar masks while the forward runs (made on first use).
        self._mask_pool: ThreadPoolExecutor | None = None
        self._seq = itertools.count()
        self.last_step = StepStats()

    # -- requests ----------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> list[Request]:
        """Validate and queue a request; returns its sequences (n of them)."""
        prompt, room = self.validate_request(prompt_token_ids, params)
        ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        if any(rid in self.scheduler.requests for rid in ids):
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        # All n sequences or none: a half-admitted request would run with nobody to read it.
        free_slots = self.config.max_waiting - len(self.scheduler.waiting)
        if len(ids) > free_slots:
            raise QueueFullError(
                f"waiting queue is full ({self.config.max_waiting} sequences); retry later"
            )
        eos = frozenset(self.model_config.eos_token_ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        reqs = []
        for i, rid in enumerate(ids):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(self.device).manual_seed(params.seed + i)
            reqs.append(
                Request(
                    request_id=rid,
                    prompt_token_ids=prompt,
                    params=params,
                    max_tokens=min(params.max_tokens or room, room),
                    eos_token_ids=eos,
                    arrival_time=arrival,
                    arrival_seq=next(self._seq),
                    priority=priority,
                    generator=gen,
                    matcher=self._matcher(params),
                )
            )
        for r in reqs:
            self.scheduler.add_request(r)
        return reqs

    def validate_request(
        self, prompt_token_ids: list[int], params: SamplingParams
    ) -> tuple[list[int], int]:
        """Raise a typed error for a request the engine cannot serve; returns (prompt, room)."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling params must be a SamplingParams")
        prompt = self._check_prompt(prompt_token_ids)
        params.check_vocab(self.model_config.vocab_size)
        self._matcher(params)  # compiles (and caches) the grammar: a bad one fails here
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise ContextLengthError(
                f"prompt has {len(prompt)} tokens; the context is {self.max_model_len}, "
                "leaving no room to generate"
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise ContextLengthError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context length ({self.max_model_len})"
            )
        return prompt, room

    def _matcher(self, params: SamplingParams):
        """A fresh grammar matcher for one sequence of a structured-output request."""
        if params.structured_output is None:
            return None
        if self.grammars is None:
            raise InvalidRequestError(
                "structured output needs the model's tokenizer (this engine has none)",
                param="structured_output",
            )
        return self.grammars.matcher(params.structured_output)

    def _check_prompt(self, prompt_token_ids: list[int]) -> list[int]:
        if prompt_token_ids is None or len(prompt_token_ids) == 0:
            raise InvalidRequestError("prompt is empty")
        try:  # numpy / torch integers are fine; floats and strings are not
            prompt = [operator.index(t) for t in prompt_token_ids]
        except TypeError:
            raise InvalidRequestError("prompt token ids must be integers") from None
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:8]}"
            )
        return prompt

    def abort_request(self, request_ids: list[str]) -> list[Request]:
        """Abort by sequence id or by parent id (all n siblings)."""
        reqs = self.scheduler.requests
        expanded = []
        for rid in request_ids:
            if rid in reqs:
                expanded.append(rid)
            # siblings are rid#0 .. rid#{n-1}, n <= MAX_N: look them up, not scan every request
            expanded.extend(k for k in (f"{rid}#{i}" for i in range(MAX_N)) if k in reqs)
        return self.scheduler.abort(expanded)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        if self.thread_governor is not None:
            self.thread_governor.tick()
        sched = self.scheduler.schedule()
        self.last_step = StepStats(len(sched.seqs), sched.num_batched_tokens, len(sched.preempted))
        if sched.is_empty:
            return []
        masks = self._start_masks(sched)
        try:
            runner_out = self.runner.execute(sched)
            sampled = self._sample(runner_out, masks)
            self._record_prompt_logprobs(sched, runner_out)
            self.scheduler.update(sched, sampled)
        except BaseException:
            if masks is not None:  # it reads the matchers: let it end before anyone moves them
                masks.exception()
            # This step's KV writes may not have happened: its blocks must not be prefix hits.
            # Counted back from where the request stands (update may or may not have moved
            # it on): forgetting a block too many only costs a cache hit.
            for s in sched.seqs:
                req = s.request
                start = max(0, req.num_computed_tokens - s.num_new_tokens)
                self.block_manager.forget_uncomputed(req.request_id, start)
            raise
        now = time.monotonic()
        outputs = []
        for s in runner_out.sample_seqs:
            req = s.request
            if req.first_token_time is None:
                req.first_token_time = now
            outputs.append(
                StepOutput(req.request_id, [req.output_token_ids[-1]], req.finish_reason, req)
            )
        return outputs

    def _start_masks(self, sched: SchedulerOutput) -> Future | None:
        """Start computing the grammar masks of the constrained rows that sample this step, on
        a thread beside the forward pass (their matchers stand still until update). None when
        no row is constrained: unconstrained steps pay nothing."""
        reqs = [s.request for s in sched.seqs if s.samples and s.request.matcher is not None]
        if not reqs:
            return None
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        return self._mask_pool.submit(self.grammars.fill_bitmask, reqs)

    def _sample(self, runner_out: RunnerOutput, masks: Future | None = None) -> dict[str, int]:
        if not runner_out.sample_seqs:
            return {}
        rows = [self._sampling_row(s.request) for s in runner_out.sample_seqs]
        token_mask = None
        if masks is not None:
            bitmask, row_of = masks.result()
            seqs = runner_out.sample_seqs
            mine = [i for i, s in enumerate(seqs) if s.request.request_id in row_of]
            order = [row_of[seqs[i].request.request_id] for i in mine]
            token_mask = TokenMask(mine, bitmask[order])
        result = self.sampler(runner_out.sample_logits, rows, token_mask)
        sampled = {}
        for i, s in enumerate(runner_out.sample_seqs):
            req = s.request
            sampled[req.request_id] = result.token_ids[i]
            if req.params.logprobs is not None:
                req.logprobs.append(result.logprobs[i])
                req.top_logprobs.append(result.top_logprobs[i] or [])
        return sampled

    @staticmethod
    def _sampling_row(req: Request) -> SamplingRow:
        banned: tuple[int, ...] = ()
        if len(req.output_token_ids) < req.params.min_tokens:
            stops = set(req.params.stop_token_ids)
            if not req.params.ignore_eos:
                stops |= req.eos_token_ids
            banned = tuple(sorted(stops))
        return SamplingRow(
            params=req.params,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids,
            generator=req.generator,
            banned_token_ids=banned,
        )

    def _record_prompt_logprobs(self, sched: SchedulerOutput, runner_out: RunnerOutput) -> None:
        for s in sched.seqs:
            logits = runner_out.prompt_logits.get(s.request.request_id)
            if logits is None:
                continue
            req = s.request
            start = req.num_computed_tokens
            # Entry k belongs to prompt token k. Row j of this chunk predicts token
            # start + j + 1: record the rows past what is recorded (a recompute after a
            # preemption may cut its chunks elsewhere, so it overlaps by any amount).
            if start == 0 and not req.prompt_logprobs:
                req.prompt_logprobs.append(None)  # the first token has no context
                req.prompt_top_logprobs.append([])
            have = len(req.prompt_logprobs)
            skip = have - start - 1  # rows whose token is recorded already
            n = min(s.num_new_tokens, req.num_prompt_tokens - 1 - start)
            if skip < 0 or n <= skip:
                continue
            targets = torch.tensor(req.prompt_token_ids[have : start + 1 + n])
            lps, tops = self.sampler.prompt_logprobs(
                logits[skip:n], targets, req.params.prompt_logprobs
            )
            req.prompt_logprobs.extend(lps)
            req.prompt_top_logprobs.extend(tops)
