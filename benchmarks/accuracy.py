"""What a reduced-precision mode costs in accuracy, on the default model (or --model).

Runs the offline engine twice in one process, first unquantized (the baseline: --dtype,
weights and KV cache in it), then in the mode asked for, and reports:

- greedy agreement over a fixed set of prompts (``PROMPTS``, 64 new tokens each, EOS ignored):
  how many continuations are identical to the baseline's, and the mean share of each
  continuation that matches before the first differing token;
- perplexity of a fixed English text (``benchmarks/data/perplexity.txt``, prose written for
  this project) from the prompt logprobs, for both runs;
- the largest and mean absolute difference of the prompt logprobs of the text's tokens.

    python -m benchmarks.accuracy --quantization int8
    python -m benchmarks.accuracy --quantization int8 --dtype bfloat16

Run by hand, not in CI; the figures go to docs/benchmarks.md ("Accuracy of the reduced-
precision modes").
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

TEXT = Path(__file__).with_name("data") / "perplexity.txt"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 4, 5,",
    "Translate to French: I would like a cup of coffee, please.",
    "The three laws of thermodynamics are",
    "Q: Why is the sky blue?\nA:",
    "Write a short poem about autumn leaves.",
    "import numpy as np\n\ndef normalize(v):",
    "The best way to learn a new language is",
    "Here is a recipe for pancakes. Ingredients:",
    "In 1969, the first humans",
    "SELECT name, COUNT(*) FROM orders",
    "Dear hiring manager, I am writing to apply for",
    "The difference between a list and a tuple in Python is",
    "Paged attention splits the KV cache into fixed-size blocks so that " * 6,
]
NEW_TOKENS = 64


def run_mode(model: str | None, dtype: str, quantization: str | None, kv_cache_dtype: str | None):
    """(greedy continuations, prompt logprobs of the text, seconds) for one engine setting."""
    from engine_svc import LLM, SamplingParams

    kwargs = {"quantization": quantization}
    if kv_cache_dtype is not None:
        kwargs["kv_cache_dtype"] = kv_cache_dtype
    t0 = time.perf_counter()
    llm = LLM(model, dtype=dtype, progress=False, enable_prefix_caching=False, **kwargs)
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, greedy, use_tqdm=False)
    continuations = [o.outputs[0].token_ids for o in outs]
    ids = llm.tokenizer.encode(TEXT.read_text())
    scored = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    plp = scored[0].prompt_logprobs
    logprobs = [plp[i][tok] for i, tok in enumerate(ids) if i > 0]
    return continuations, logprobs, time.perf_counter() - t0


def compare(base: tuple, other: tuple) -> dict:
    (b_cont, b_lp, _), (o_cont, o_lp, _) = base, other
    same = sum(a == b for a, b in zip(b_cont, o_cont))
    prefix = []
    for a, b in zip(b_cont, o_cont):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(k / max(len(a), 1))
    diffs = [abs(x - y) for x, y in zip(b_lp, o_lp)]
    return {
        "identical": same,
        "prompts": len(b_cont),
        "prefix_share": sum(prefix) / len(prefix),
        "ppl_base": math.exp(-sum(b_lp) / len(b_lp)),
        "ppl": math.exp(-sum(o_lp) / len(o_lp)),
        "text_tokens": len(b_lp) + 1,
        "lp_max_diff": max(diffs),
        "lp_mean_diff": sum(diffs) / len(diffs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default model if unset)")
    ap.add_argument(
        "--dtype", default="float32", help="activations (and the baseline's weights and KV)"
    )
    ap.add_argument("--quantization", default=None, choices=["int8"], help="weights")
    ap.add_argument(
        "--kv-cache-dtype", default=None, help="KV cache precision, where the engine has it"
    )
    args = ap.parse_args(argv)
    if args.quantization is None and args.kv_cache_dtype is None:
        ap.error("nothing to compare: give --quantization and/or --kv-cache-dtype")
    base = run_mode(args.model, args.dtype, None, None)
    other = run_mode(args.model, args.dtype, args.quantization, args.kv_cache_dtype)
    r = compare(base, other)
    mode = ", ".join(
        f"{k} {v}"
        for k, v in (("weights", args.quantization), ("KV cache", args.kv_cache_dtype))
        if v
    )
    print(f"mode: {mode}; activations {args.dtype}; baseline: everything in {args.dtype}")
    print(
        f"greedy, {r['prompts']} prompts x {NEW_TOKENS} tokens: {r['identical']}/{r['prompts']} "
        f"identical, {100 * r['prefix_share']:.1f} % of tokens before the first difference"
    )
    print(
        f"perplexity of benchmarks/data/perplexity.txt ({r['text_tokens']} tokens): "
        f"{r['ppl_base']:.3f} -> {r['ppl']:.3f} ({100 * (r['ppl'] / r['ppl_base'] - 1):+.2f} %)"
    )
    print(
        f"prompt logprob difference per token: max {r['lp_max_diff']:.4f}, "
        f"mean {r['lp_mean_diff']:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
