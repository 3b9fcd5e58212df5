"""Sampler: exact greedy/penalty/logprob behaviour, and sampled distributions checked against
hand-computed ones over many rows drawn in one batched call (a fixed generator keeps every
test deterministic)."""

from __future__ import annotations

import math

import pytest
import torch

from engine_svc.sampler import Sampler, SamplingRow, apply_penalties
from protos.sampling import SamplingParams

# Probabilities of a small vocabulary whose nucleus and min_p sets are easy to compute by hand.
PROBS6 = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]


def row(
    *,
    prompt: tuple[int, ...] = (),
    output: tuple[int, ...] = (),
    seed: int | None = None,
    banned: tuple[int, ...] = (),
    **params: object,
) -> SamplingRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(seed=seed, **params), prompt, output, gen, banned)


def sampler(seed: int = 0) -> Sampler:
    return Sampler(torch.Generator().manual_seed(seed))


def draw(logits_row: list[float], n: int, seed: int = 0, **params: object) -> torch.Tensor:
    """``n`` unseeded samples of one row, drawn as one batch of ``n`` identical rows."""
    logits = torch.tensor([logits_row], dtype=torch.float32).expand(n, -1).contiguous()
    out = sampler(seed)(logits, [row(**params) for _ in range(n)])
    return torch.tensor(out.token_ids)


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def chi_square(tokens: torch.Tensor, probs: list[float]) -> float:
    expected = torch.tensor(probs, dtype=torch.float64) * tokens.numel()
    observed = torch.bincount(tokens, minlength=len(probs)).double()
    assert observed[expected == 0].sum() == 0, "sampled a token of probability 0"
    keep = expected > 0
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# --- greedy, bias, bans -----------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    out = sampler()(logits, [row(temperature=0.0) for _ in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6


def test_greedy_rows_in_a_mixed_batch_take_the_argmax() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    rows = [row(temperature=0.0), row(temperature=1.0), row(temperature=0.0, logprobs=1), row()]
    out = sampler()(logits, rows)
    argmax = logits.argmax(-1).tolist()
    assert [out.token_ids[0], out.token_ids[2]] == [argmax[0], argmax[2]]


def test_logit_bias_forces_and_forbids_a_token() -> None:
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(3))
    low = int(logits.argmin())
    top = int(logits.argmax())
    assert sampler()(logits, [row(temperature=0.0, logit_bias={low: 100.0})]).token_ids == [low]
    second = int(logits[0].topk(2).indices[1])
    assert sampler()(logits, [row(temperature=0.0, logit_bias={top: -100.0})]).token_ids == [second]
    tokens = draw(logits[0].tolist(), 500, logit_bias={low: 100.0})
    assert torch.all(tokens == low)


def test_banned_ids_are_never_sampled() -> None:
    banned = (0, 2, 3, 5, 7)
    tokens = draw([0.0] * 8, 4000, banned=banned, temperature=2.0)
    assert set(tokens.tolist()) == {1, 4, 6}
    # Banned beats a huge bias, and applies to greedy rows too.
    logits = torch.zeros(1, 8)
    r = row(temperature=0.0, logit_bias={5: 100.0}, banned=(5,))
    assert sampler()(logits, [r]).token_ids != [5]


def test_input_logits_are_not_modified() -> None:
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(4))
    before = logits.clone()
    rows = [
        row(logit_bias={1: 5.0}, banned=(2,), output=(3, 3), frequency_penalty=1.0, top_p=0.5)
    ] * 2
    sampler()(logits, rows)
    assert torch.equal(logits, before)


# --- top_k, top_p, min_p --------------------------------------------------------------------------


def test_top_k_1_is_greedy() -> None:
    logits = torch.randn(300, 40, generator=torch.Generator().manual_seed(5))
    rows = [row(temperature=1.5, top_k=1, seed=i) for i in range(300)]
    assert sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_top_k_samples_stay_inside_the_top_k_set_and_cover_it() -> None:
    logits = torch.randn(20, generator=torch.Generator().manual_seed(6))
    allowed = set(logits.topk(5).indices.tolist())
    tokens = draw(logits.tolist(), 4000, top_k=5, temperature=3.0)
    assert set(tokens.tolist()) == allowed


def test_top_k_larger_than_vocab_is_off() -> None:
    tokens = draw([0.0] * 6, 3000, top_k=100)
    assert set(tokens.tolist()) == set(range(6))


def test_top_p_keeps_the_nucleus() -> None:
    logits = [math.log(p) for p in PROBS6]
    # Mass before tokens 0..5: 0, .4, .65, .8, .9, .96 → p=.7 keeps {0, 1, 2}.
    tokens = draw(logits, 20000, top_p=0.7)
    assert set(tokens.tolist()) == {0, 1, 2}
    nucleus = [p / 0.8 for p in PROBS6[:3]] + [0.0] * 3
    assert chi_square(tokens, nucleus) < 13.8  # df=2, p=0.001
    assert set(draw(logits, 2000, top_p=0.3).tolist()) == {0}  # at least one token kept
    assert set(draw(logits, 4000, top_p=0.95).tolist()) == {0, 1, 2, 3, 4}


def test_top_p_applies_to_the_top_k_renormalised_distribution() -> None:
    logits = [math.log(p) for p in PROBS6]
    # top_k=2 leaves {.4, .25} → {.615, .385}; p=.5 then keeps token 0 only (on the raw
    # distribution, mass .4 before token 1 would keep it).
    assert set(draw(logits, 3000, top_k=2, top_p=0.5).tolist()) == {0}
    assert set(draw(logits, 3000, top_k=2, top_p=0.9).tolist()) == {0, 1}


def test_min_p_is_relative_to_the_top_probability() -> None:
    logits = [math.log(p) for p in PROBS6]
    # min_p=.3 → threshold .12 keeps {0, 1, 2}; min_p=.5 → .2 keeps {0, 1}.
    tokens = draw(logits, 20000, min_p=0.3)
    assert set(tokens.tolist()) == {0, 1, 2}
    assert chi_square(tokens, [p / 0.8 for p in PROBS6[:3]] + [0.0] * 3) < 13.8
    assert set(draw(logits, 3000, min_p=0.5).tolist()) == {0, 1}
    assert set(draw(logits, 3000, min_p=1.0).tolist()) == {0}


def test_filters_of_one_row_do_not_leak_into_others() -> None:
    logits = torch.tensor([[math.log(p) for p in PROBS6]]).expand(3000, -1).contiguous()
    rows = [row(top_p=0.3), row(top_k=1), row(min_p=0.9), row()] * 750
    tokens = torch.tensor(sampler()(logits, rows).token_ids).view(750, 4)
    assert set(tokens[:, :3].flatten().tolist()) == {0}
    assert set(tokens[:, 3].tolist()) == set(range(6))


# --- temperature ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_frequencies_match_softmax(temperature: float) -> None:
    logits = [1.0, 0.5, 0.0, -1.0]
    tokens = draw(logits, 20000, seed=7, temperature=temperature)
    expected = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, -1)
    assert chi_square(tokens, expected.tolist()) < 16.3  # df=3, p=0.001
    # The bound can fail: the untempered distribution is rejected by far.
    assert chi_square(tokens, torch.softmax(torch.tensor(logits), -1).tolist()) > 100


# --- penalties --------------------------------------------------------------------------------------


def test_apply_penalties_follows_the_formulas() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0], [2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    rows = [
        row(
            prompt=(0, 1),
            output=(2, 3, 3),
            repetition_penalty=2.0,
            presence_penalty=0.5,
            frequency_penalty=0.25,
        ),
        row(prompt=(0,), output=(5,)),  # no penalties: untouched
    ]
    apply_penalties(logits, rows)
    # token 0 (prompt, >0): 2/2; 1 (prompt, <0): -2*2; 2 (output once): 1/2 - .5 - .25;
    # 3 (output twice): -1*2 - .5 - .5; 4, 5 unseen.
    expected0 = [1.0, -4.0, 0.5 - 0.75, -2.0 - 1.0, 0.5, 3.0]
    assert logits[0].tolist() == expected0
    assert logits[1].tolist() == [2.0, -2.0, 1.0, -1.0, 0.5, 3.0]


def test_presence_and_frequency_ignore_the_prompt() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    apply_penalties(
        logits, [row(prompt=(0,), output=(1,), presence_penalty=1.0, frequency_penalty=1.0)]
    )
    assert logits.tolist() == [[1.0, -1.0, 1.0]]


def test_negative_penalties_reward_repetition() -> None:
    logits = torch.tensor([[1.0, 0.0]])
    apply_penalties(logits, [row(output=(1, 1), presence_penalty=-0.5, frequency_penalty=-1.0)])
    assert logits.tolist() == [[1.0, 2.5]]


def test_penalties_flip_greedy_choices() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    s = sampler()
    assert s(logits, [row(temperature=0.0, output=(0,))]).token_ids == [0]
    assert s(logits, [row(temperature=0.0, prompt=(0,), repetition_penalty=2.0)]).token_ids == [1]
    assert s(logits, [row(temperature=0.0, output=(0,), presence_penalty=1.5)]).token_ids == [1]
    assert s(logits, [row(temperature=0.0, output=(0,) * 3, frequency_penalty=0.5)]).token_ids == [
        1
    ]
    assert s(logits, [row(temperature=0.0, output=(0,) * 2, frequency_penalty=0.4)]).token_ids == [
        0
    ]


# --- seeds ------------------------------------------------------------------------------------------


def _seeded_run(seed: int, others: int, position: int, steps: int = 12) -> list[int]:
    """Sample ``steps`` tokens of one seeded row placed at ``position`` in a batch with
    ``others`` random rows (seeded and unseeded, other filters); fresh random logits per step
    for the others, the same per-step logits for the seeded row."""
    vocab = 500
    target_logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(99))
    noise = torch.Generator().manual_seed(1000 + others + position)
    s = Sampler(torch.Generator().manual_seed(others * 31 + position))
    target = row(seed=seed, temperature=0.8, top_p=0.9, top_k=200, min_p=0.01)
    kinds = [lambda i: row(), lambda i: row(seed=7000 + i, top_k=3), lambda i: row(temperature=0.0)]
    other_rows = [kinds[i % 3](i) for i in range(others)]
    tokens = []
    for step in range(steps):
        logits = torch.randn(others + 1, vocab, generator=noise)
        logits[position] = target_logits[step]
        rows = other_rows[:position] + [target] + other_rows[position:]
        tokens.append(s(logits, rows).token_ids[position])
        target.output_token_ids = (*target.output_token_ids, tokens[-1])
    return tokens


def test_seeded_row_is_independent_of_the_batch() -> None:
    alone = _seeded_run(seed=42, others=0, position=0)
    assert _seeded_run(seed=42, others=5, position=0) == alone
    assert _seeded_run(seed=42, others=5, position=3) == alone
    assert _seeded_run(seed=42, others=8, position=8) == alone
    assert _seeded_run(seed=43, others=0, position=0) != alone


def test_seeded_draws_follow_the_generator() -> None:
    logits = torch.zeros(1, 1000)
    a = [sampler(1)(logits, [row(seed=5)]).token_ids[0] for _ in range(3)]
    b = [sampler(2)(logits, [row(seed=5)]).token_ids[0] for _ in range(3)]
    assert a == b  # a fresh generator with the same seed repeats its first draw
    r = row(seed=5)
    s = sampler()
    stream = [s(logits, [r]).token_ids[0] for _ in range(3)]
    assert stream[0] == a[0] and len(set(stream)) == 3  # the row's generator advances


# --- logprobs ---------------------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_distribution() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(8))
    rows = [
        row(
            logprobs=5, temperature=0.3, output=(1, 2), repetition_penalty=1.5, logit_bias={3: 2.0}
        ),
        row(),
        row(logprobs=0, temperature=0.0),
    ]
    out = sampler()(logits, rows)
    raw = torch.log_softmax(logits, -1)
    t0, t2 = out.token_ids[0], out.token_ids[2]
    assert out.logprobs[0] == pytest.approx(float(raw[0, t0]), abs=1e-6)
    assert out.logprobs[2] == pytest.approx(float(raw[2, t2]), abs=1e-6)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.top_logprobs[2] == []
    vals, ids = raw[0].topk(5)
    assert [t for t, _ in out.top_logprobs[0]] == ids.tolist()
    assert [v for _, v in out.top_logprobs[0]] == pytest.approx(vals.tolist(), abs=1e-6)
    got = [v for _, v in out.top_logprobs[0]]
    assert got == sorted(got, reverse=True)


def test_greedy_token_tied_for_best_is_listed_first() -> None:
    """Two tokens share the best logit (as bf16 logits often do): greedy takes the lower id,
    and the top list puts that one first, then the other, whatever order topk gave them."""
    g = torch.Generator().manual_seed(3)
    rows = [row(logprobs=3, temperature=0.0) for _ in range(64)]
    logits = torch.randn(64, 49152, generator=g)
    pairs = [sorted(torch.randperm(49152, generator=g)[:2].tolist()) for _ in rows]
    for r, (i, j) in enumerate(pairs):
        logits[r, i] = logits[r, j] = 10.0
    out = sampler()(logits, rows)
    for r, (i, j) in enumerate(pairs):
        assert out.token_ids[r] == i
        assert [t for t, _ in out.top_logprobs[r][:2]] == [i, j]
        assert out.top_logprobs[r][0][1] == out.logprobs[r]
    # Ties cut at k: the kept tokens are the lowest ids (CPU topk happens to keep those, CUDA's
    # makes no such promise). One logprob asked: the kept token is still the greedy one.
    out = sampler()(logits, [row(logprobs=1, temperature=0.0) for _ in rows])
    assert [top[0][0] for top in out.top_logprobs] == [i for i, _ in pairs] == out.token_ids
    # a three-way tie cut at k = 2
    flat = torch.zeros(1, 1000)
    flat[0, [700, 20, 400]] = 5.0
    out = sampler()(flat, [row(logprobs=2, temperature=0.0)])
    assert out.token_ids == [20] and [t for t, _ in out.top_logprobs[0]] == [20, 400]


def test_sampled_logprob_is_returned_outside_the_top_k() -> None:
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(9))
    low = int(logits.argmin())
    out = sampler()(logits, [row(logprobs=2, temperature=0.0, logit_bias={low: 100.0})])
    assert out.token_ids == [low]
    assert low not in [t for t, _ in out.top_logprobs[0]]
    assert len(out.top_logprobs[0]) == 2
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(logits, -1)[0, low]), abs=1e-6)


def test_prompt_logprobs_against_a_hand_computation() -> None:
    rows = [[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, math.log(2.0), 0.0], [5.0, -1.0, 5.0, 2.0]]
    targets = [0, 2, 3]
    chosen, top = sampler().prompt_logprobs(torch.tensor(rows), torch.tensor(targets), 2)
    for r, t, lp, best in zip(rows, targets, chosen, top, strict=True):
        log_z = math.log(sum(math.exp(v) for v in r))
        assert lp == pytest.approx(r[t] - log_z, abs=1e-6)
        assert [tok for tok, _ in best][:1] == [max(range(4), key=lambda i: (r[i], -i))]
        assert [v for _, v in best] == pytest.approx(
            sorted((v - log_z for v in r), reverse=True)[:2], abs=1e-6
        )
    assert chosen[1] == pytest.approx(math.log(2.0 / 5.0), abs=1e-6)
    _, none = sampler().prompt_logprobs(torch.tensor(rows), torch.tensor(targets), 0)
    assert none == [[], [], []]


# --- robustness -------------------------------------------------------------------------------------


def test_neg_inf_logits_never_give_nan_or_masked_tokens() -> None:
    vocab = 16
    logits = torch.randn(2000, vocab, generator=torch.Generator().manual_seed(10))
    logits[:, ::2] = float("-inf")
    rows = [
        row(top_p=0.8, top_k=4, min_p=0.05, output=(0, 1, 3), repetition_penalty=1.3,
            presence_penalty=0.5, frequency_penalty=-0.5, logprobs=3, logit_bias={2: 1.0})
        for _ in range(2000)
    ]  # fmt: skip
    out = sampler()(logits, rows)
    assert all(t % 2 == 1 for t in out.token_ids)
    assert all(math.isfinite(lp) for lp in out.logprobs)


def test_all_banned_row_still_gives_an_in_range_token() -> None:
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(11))
    everything = tuple(range(10))
    rows = [row(banned=everything), row(temperature=0.0, banned=everything)]
    out = sampler()(logits, rows)
    assert all(0 <= t < 10 for t in out.token_ids)
    assert out.token_ids[1] == int(logits[1].argmax())  # falls back to the raw logits
    dead = torch.full((1, 10), float("-inf"))
    assert 0 <= sampler()(dead, [row()]).token_ids[0] < 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(dtype: torch.dtype) -> None:
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(12)).to(dtype)
    greedy = sampler()(logits, [row(temperature=0.0)] * 4)
    assert greedy.token_ids == logits.float().argmax(-1).tolist()
    rows = [row(logprobs=3, temperature=0.0), row(top_p=0.5, seed=1), row(min_p=0.2), row(top_k=2)]
    out = sampler()(logits, rows)
    assert out.token_ids[0] == int(logits[0].float().argmax())
    assert out.logprobs[0] == pytest.approx(
        float(torch.log_softmax(logits[0].float(), -1).max()), abs=1e-6
    )
    assert all(0 <= t < 64 for t in out.token_ids)


def test_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError):
        sampler()(torch.zeros(2, 5), [row()])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=10**400), "temperature"),  # an int too large for a float
        (dict(top_p=-(10**400)), "top_p"),
        (dict(n=True), "n must be"),  # a bool is not a count
        (dict(seed=True), "seed"),
        (dict(max_tokens=True), "max_tokens"),
        (dict(stop_token_ids=[False]), "stop_token_ids"),
        (dict(logprobs=True), "logprobs"),
    ],
)
def test_sampling_params_refuse_overflow_and_bools_with_a_typed_error(kwargs, message):
    from protos.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)
