"""Batched sampler: the logits of the rows that sample this step → one token per row.

Processing order (vLLM V1's), each step a few batched tensor ops, never a Python loop over the
vocabulary:

0. structured-output rows: tokens their grammar does not allow (a bitmask, ``TokenMask``) are
   set to -inf in one batched op over those rows only;
1. ``logit_bias`` is added, then banned ids (e.g. EOS and stop ids before ``min_tokens``) are
   set to -inf;
2. repetition penalty on tokens seen in the prompt or the output (positive logits divided by
   it, negative ones multiplied), then presence and frequency penalties on output tokens;
3. greedy rows (temperature below 1e-5, as vLLM) take the argmax of that; the others are
   divided by their temperature, filtered by min_p (relative to the top probability), top_k,
   then top_p (on the top_k-renormalised distribution), and sampled.

Logprobs are those of the RAW model distribution (log_softmax of the incoming logits, before
any of the above), as vLLM V1 returns by default.

Sampling is the exponential race: ``argmax(p / q)`` with ``q ~ Exp(1)`` i.i.d. picks token i
with probability ``p_i``. A seeded row draws its ``q`` from its own generator (one draw of V
numbers per step), so its tokens depend only on its logits and its generator's state, never
on the rest of the batch or its position in it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from protos.sampling import SamplingParams

# Temperatures below this are greedy: logits / 1e-30 would overflow to inf (vLLM's _SAMPLING_EPS).
GREEDY_EPS = 1e-5
# prompt_logprobs works on this many positions at a time, bounding the float32 copy.
PROMPT_LOGPROBS_CHUNK = 1024

_NEG_INF = float("-inf")


@dataclass(slots=True)
class SamplingRow:
    """One sequence that samples a token this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]  # read only when repetition_penalty != 1
    output_token_ids: Sequence[int]  # tokens generated so far, for the penalties
    # Set for seeded requests, on the logits' device; only this row's draws advance it.
    generator: torch.Generator | None
    banned_token_ids: Sequence[int] = ()  # set to -inf, e.g. EOS + stop ids before min_tokens


@dataclass(slots=True)
class TokenMask:
    """The allowed tokens of the rows under a grammar: ``bitmask[j]`` (int32 words, bit
    ``t % 32`` of word ``t // 32`` for token t, llguidance's layout) belongs to row
    ``rows[j]``. Rows not listed are unconstrained."""

    rows: list[int]
    bitmask: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32, any device


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    # Raw-distribution logprob of the sampled token, for rows with params.logprobs set.
    logprobs: list[float | None]
    # params.logprobs best (token id, raw logprob), best first, for rows that asked.
    top_logprobs: list[list[tuple[int, float]] | None]


class Sampler:
    """Stateless apart from ``generator``, which draws for unseeded rows (None: torch's
    default generator of the logits' device)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(
        self,
        logits: torch.Tensor,
        rows: Sequence[SamplingRow],
        token_mask: TokenMask | None = None,
    ) -> SampleResult:
        """Sample one token per row from ``logits`` [len(rows), vocab] (any float dtype),
        among the tokens ``token_mask`` allows for the rows it lists."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        n = len(rows)
        if token_mask is not None and not token_mask.rows:
            token_mask = None
        if token_mask is None and all(_plain_greedy(r) for r in rows):  # fast path: one op
            return SampleResult(logits.argmax(dim=-1).tolist(), [None] * n, [None] * n)

        x = logits.to(torch.float32, copy=True)  # never touch the caller's tensor
        if token_mask is not None:
            apply_token_mask(x, token_mask)
        _apply_bias_and_bans(x, rows)
        if any(_has_penalties(r.params) for r in rows):
            apply_penalties(x, rows)
        _revive_dead_rows(x, logits, token_mask)
        tokens = self._choose(x, rows)
        logprobs, top = _raw_logprobs(logits, rows, tokens)
        return SampleResult(tokens.tolist(), logprobs, top)

    def prompt_logprobs(
        self, logits: torch.Tensor, target_ids: torch.Tensor, k: int
    ) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """Raw logprob of each ``target_ids[t]`` under ``logits[t]`` ([T, vocab], T consecutive
        prompt positions, targets the next prompt tokens), and the ``k`` best (token id,
        logprob) of each position, best first."""
        num, vocab = logits.shape
        if target_ids.shape != (num,):
            raise ValueError(f"target_ids {tuple(target_ids.shape)} do not match logits {num}")
        target = target_ids.to(device=logits.device, dtype=torch.long)
        k = min(k, vocab)
        chosen: list[float] = []
        top: list[list[tuple[int, float]]] = []
        for start in range(0, num, PROMPT_LOGPROBS_CHUNK):
            end = min(start + PROMPT_LOGPROBS_CHUNK, num)
            lp = torch.log_softmax(logits[start:end].float(), dim=-1)
            chosen += lp.gather(1, target[start:end, None]).squeeze(1).tolist()
            top += _top_lists(lp, k) if k > 0 else [[] for _ in range(end - start)]
        return chosen, top

    def _choose(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Greedy rows: argmax of the processed logits; the others sampled. Returns [B] long."""
        random = [i for i, r in enumerate(rows) if r.params.temperature >= GREEDY_EPS]
        if len(random) == len(rows):
            return self._sample(x, rows)
        tokens = x.argmax(dim=-1)
        if random:
            idx = torch.tensor(random, device=x.device)
            tokens[idx] = self._sample(x[idx], [rows[i] for i in random])
        return tokens

    def _sample(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Temperature, min_p, top_k, top_p, then the exponential race; ``x`` is consumed."""
        params = [r.params for r in rows]
        vocab = x.shape[1]
        x.div_(_column([p.temperature for p in params], x.device))
        if any(p.min_p > 0.0 for p in params):
            _apply_min_p(x, _column([p.min_p for p in params], x.device))
        ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]  # vocab = off
        use_k = any(k < vocab for k in ks)
        if any(p.top_p < 1.0 for p in params):
            top_k = torch.tensor(ks, device=x.device) if use_k else None
            _apply_top_k_top_p(x, top_k, torch.tensor([p.top_p for p in params], device=x.device))
        elif use_k:
            _apply_top_k(x, ks)
        probs = torch.softmax(x, dim=-1)
        return probs.div_(self._exponentials(probs, rows)).argmax(dim=-1)

    def _exponentials(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """q ~ Exp(1) shaped like ``probs``: one batched draw for the unseeded rows, one draw
        of a whole row from its own generator for each seeded row."""
        q = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(rows) if r.generator is not None]
        if len(seeded) < len(rows):
            q.exponential_(generator=self.generator)
        for i in seeded:
            q[i].exponential_(generator=rows[i].generator)
        # Exp(1) may round to 0: p / 0 would be inf, or NaN where p is 0 too.
        return q.clamp_min_(torch.finfo(torch.float32).tiny)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition, then presence and frequency penalties, in place on float32 ``logits`` [B, V].

    Repetition penalty r, for tokens in the prompt or the output: ``l / r`` if ``l > 0`` else
    ``l * r``. Then ``l -= frequency * count + presence * (count > 0)``, count being the
    token's occurrences in the output. Rows without penalties are left as they are.
    """
    n, vocab = logits.shape
    dev = logits.device
    params = [r.params for r in rows]  # rows without penalties hold the neutral values
    # Token ids are gathered only from the rows whose penalties need them.
    outputs = [r.output_token_ids if _has_penalties(r.params) else () for r in rows]
    counts = _token_counts(outputs, n, vocab, dev)
    seen = counts > 0
    if any(p.repetition_penalty != 1.0 for p in params):
        prompts = [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else () for r in rows]
        in_context = seen | (_token_counts(prompts, n, vocab, dev) > 0)
        rep = _column([p.repetition_penalty for p in params], dev)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits.copy_(torch.where(in_context, penalized, logits))
    freq = _column([p.frequency_penalty for p in params], dev)
    pres = _column([p.presence_penalty for p in params], dev)
    logits.sub_(freq * counts + pres * seen)
    return logits


def _plain_greedy(row: SamplingRow) -> bool:
    p = row.params
    return (
        p.temperature < GREEDY_EPS
        and not p.logit_bias
        and not row.banned_token_ids
        and not _has_penalties(p)
        and p.logprobs is None
    )


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def _apply_bias_and_bans(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Add logit_bias, then set banned ids to -inf. Ids outside the vocabulary are ignored
    (an upstream bug, but an out-of-range index would be fatal on CUDA)."""
    vocab = x.shape[1]
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_vals: list[float] = []
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    for i, r in enumerate(rows):
        for t, b in (r.params.logit_bias or {}).items():
            if 0 <= t < vocab:
                bias_rows.append(i)
                bias_ids.append(t)
                bias_vals.append(b)
        for t in r.banned_token_ids:
            if 0 <= t < vocab:
                ban_rows.append(i)
                ban_ids.append(t)
    dev = x.device
    if bias_rows:
        where = (torch.tensor(bias_rows, device=dev), torch.tensor(bias_ids, device=dev))
        x.index_put_(where, torch.tensor(bias_vals, device=dev), accumulate=True)
    if ban_rows:
        x[torch.tensor(ban_rows, device=dev), torch.tensor(ban_ids, device=dev)] = _NEG_INF


def apply_token_mask(x: torch.Tensor, mask: TokenMask) -> None:
    """Set the tokens ``mask`` disallows to -inf in its rows of ``x`` [B, vocab], in place: the
    bits are unpacked for those rows only, in one batched AND. Tokens past the bitmask's
    width are disallowed."""
    vocab = x.shape[1]
    bitmask = mask.bitmask.to(x.device, non_blocking=True)
    bits = torch.ones(32, dtype=torch.int32, device=x.device) << torch.arange(
        32, dtype=torch.int32, device=x.device
    )  # 1 << 31 is the sign bit: & still tests it
    # [R, words, 32] -> [R, words * 32]: bit j of word w is token 32 * w + j.
    disallowed = ((bitmask[:, :, None] & bits) == 0).flatten(1)
    if disallowed.shape[1] < vocab:
        disallowed = torch.nn.functional.pad(
            disallowed, (0, vocab - disallowed.shape[1]), value=True
        )
    idx = torch.tensor(mask.rows, device=x.device)
    x[idx] = x[idx].masked_fill_(disallowed[:, :vocab], _NEG_INF)


def _revive_dead_rows(x: torch.Tensor, raw: torch.Tensor, mask: TokenMask | None) -> None:
    """A row with every token at -inf would give NaN probabilities: fall back to its raw
    logits, -inf made finite, so it still yields an in-range token. That happens when bans
    (EOS before min_tokens) remove the only tokens a grammar allows, e.g. EOS once it is
    complete: the grammar wins, so a constrained row keeps its mask."""
    dead = x.amax(dim=-1) == _NEG_INF
    if not bool(dead.any()):
        return
    revived = torch.nan_to_num(raw.float())
    if mask is not None:
        masked = revived.clone()
        apply_token_mask(masked, mask)
        # A mask that allows nothing (a matcher in its error state) cannot be kept.
        keep = masked.amax(dim=-1) > _NEG_INF
        revived = torch.where(keep[:, None], masked, revived)
    x[dead] = revived[dead]


def _token_counts(
    seqs: Sequence[Sequence[int]], n: int, vocab: int, device: torch.device
) -> torch.Tensor:
    """[n, vocab] float32 occurrences of each token in ``seqs[i]``: one flat scatter_add, no
    padding. Out-of-range ids land in a spare column that is dropped."""
    width = vocab + 1
    counts = torch.zeros(n * width, dtype=torch.float32, device=device)
    lens = torch.tensor([len(s) for s in seqs])
    if int(lens.sum()) > 0:
        ids = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
        row = torch.repeat_interleave(torch.arange(n), lens)
        flat = (row * width + ids.clamp(0, vocab)).to(device)
        counts.scatter_add_(0, flat, torch.ones(flat.shape, dtype=torch.float32, device=device))
    return counts.view(n, width)[:, :vocab]


def _apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drop tokens whose probability is below ``min_p`` [B, 1] times the row's top one."""
    probs = torch.softmax(x, dim=-1)
    x.masked_fill_(probs < probs.amax(dim=-1, keepdim=True) * min_p, _NEG_INF)


def _apply_top_k(x: torch.Tensor, ks: list[int]) -> None:
    """Keep tokens at least as large as the row's k-th largest logit (ties at the k-th are
    kept); k == vocab keeps everything. Uses topk up to the largest k, not a full sort."""
    vocab = x.shape[1]
    largest = max(k for k in ks if k < vocab)
    top = x.topk(largest, dim=-1).values
    kth = top.gather(1, torch.tensor([min(k, largest) - 1 for k in ks], device=x.device)[:, None])
    off = torch.tensor([k == vocab for k in ks], device=x.device)[:, None]
    x.masked_fill_((x < kth) & ~off, _NEG_INF)


def _apply_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> None:
    """top_k ([B], vocab = off) then top_p ([B]) on one descending sort. top_p keeps the
    smallest prefix whose mass reaches p (always at least the best token) of the
    distribution already cut by top_k."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    if top_k is not None:
        kth = sorted_x.gather(1, top_k[:, None] - 1)
        sorted_x.masked_fill_(sorted_x < kth, _NEG_INF)
    probs = torch.softmax(sorted_x, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # p == 1 rows keep everything; rounding could otherwise make mass_before reach 1.
    drop = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
    sorted_x.masked_fill_(drop, _NEG_INF)
    x.scatter_(1, order, sorted_x)


def _raw_logprobs(
    logits: torch.Tensor, rows: Sequence[SamplingRow], tokens: torch.Tensor
) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Sampled-token logprob and top-k of the raw distribution, for rows that asked."""
    n = len(rows)
    logprobs: list[float | None] = [None] * n
    top: list[list[tuple[int, float]] | None] = [None] * n
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return logprobs, top
    idx = torch.tensor(want, device=logits.device)
    lp = torch.log_softmax(logits[idx].float(), dim=-1)
    chosen = lp.gather(1, tokens[idx][:, None]).squeeze(1).tolist()
    k = min(max(rows[i].params.logprobs for i in want), logits.shape[1])
    best = _top_lists(lp, k) if k > 0 else [[] for _ in want]
    for j, i in enumerate(want):
        logprobs[i] = chosen[j]
        top[i] = best[j][: rows[i].params.logprobs]
    return logprobs, top


def _top_lists(lp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Each row's k best (token, logprob), best first, equal logprobs by token id: the order in
    which argmax picks among ties, so a greedy token tied for best is listed first. topk alone
    leaves ties in any order and may keep any of the tokens tied at its k-th value, so a row
    with a tie there takes every token at or above that value, sorted, then the first k."""
    # One more than asked: a token outside the k best that ties the k-th shows as the next.
    vals, ids = lp.topk(min(k + 1, lp.shape[-1]), dim=-1)
    out = []
    for r, (i, v) in enumerate(zip(ids.tolist(), vals.tolist(), strict=True)):
        tie_at_kth = len(v) > k and v[k] == v[k - 1]
        i, v = i[:k], v[:k]
        if tie_at_kth or len(set(v)) < k:  # a tie at or above the k-th value
            cand = (lp[r] >= v[-1]).nonzero().squeeze(1)  # ascending ids
            order = torch.sort(lp[r, cand], descending=True, stable=True).indices[:k]
            i, v = cand[order].tolist(), lp[r, cand[order]].tolist()
        out.append(list(zip(i, v, strict=True)))
    return out
