"""Host time of the CUDA runner's per-step input building, on any machine (no GPU needed).

A decode step of the CUDA path is a graph replay of a few milliseconds; the Python that builds
its inputs (token ids, positions, slots, block tables) runs on the host before it, and at 256
sequences of long context that used to cost as much as the step itself. This times
``CudaModelRunner.build_batch`` (device ``cpu``, so no copy to a GPU) for 256 decodes at a few
context lengths, each step adding one token per sequence (a new block every 16 tokens).

    python -m benchmarks.runner_host                    # this checkout
    python -m benchmarks.runner_host --against 128c6d6  # and an older CUDA runner,
                                                        # side by side in one run
    python -m benchmarks.runner_host --engine-step      # a whole engine step's host time by
                                                        # part, the model forward left out
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

from engine_svc.models.config import ModelConfig
from engine_svc.models.loader import dummy_model
from engine_svc.runner import cuda as cuda_runner
from engine_svc.runner.cuda_model_ops import BatchTensors

REPO = Path(__file__).resolve().parents[1]
BLOCK = 16
NUM_SEQS = 256


# Module names before the layout change (issue 11) -> where that code lives now.
_OLD_MODULES = {
    "engine_svc.model": "engine_svc.models.llama",
    "engine_svc.model_config": "engine_svc.models.config",
    "engine_svc.model_runner": "engine_svc.runner.cpu",
    "engine_svc.cuda_graphs": "engine_svc.runner.cuda_graphs",
    "engine_svc.scheduler": "engine_svc.core.scheduler",
}


def _old_module(rev: str) -> ModuleType:
    src = None
    for old_path in ("engine_svc/runner/cuda.py", "engine_svc/cuda_runner.py"):  # after, before
        res = subprocess.run(
            ["git", "show", f"{rev}:{old_path}"], cwd=REPO, capture_output=True, text=True
        )
        if res.returncode == 0:
            src = res.stdout
            break
    if src is None:
        raise SystemExit(f"{rev} has no CUDA runner (engine_svc/runner/cuda.py or cuda_runner.py)")
    path = Path(tempfile.mkdtemp()) / "cuda_runner_old.py"
    path.write_text(src)
    # Older revisions import BatchTensors and the CUDA forward from a cuda_forward module, now
    # gone, and the rest from the modules' names before engine_svc/ was split into rooms: the
    # input building timed here needs only BatchTensors (same fields) and those helpers.
    stand_in = ModuleType("cuda_forward")
    stand_in.BatchTensors, stand_in.forward = BatchTensors, None
    sys.modules.setdefault("engine_svc.runner.cuda_forward", stand_in)
    sys.modules.setdefault("engine_svc.cuda_forward", stand_in)
    for old, new in _OLD_MODULES.items():
        sys.modules.setdefault(old, importlib.import_module(new))
    spec = importlib.util.spec_from_file_location("cuda_runner_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_fn(runner):
    """The runner's input building, for this version or an older one without build_batch."""
    if hasattr(runner, "build_batch"):
        return runner.build_batch

    def old_build(seqs):  # the old execute() up to the device copy, line for line
        ids, positions, slots, seq_lens, tables, starts = [], [], [], [], [], [0]
        for s in seqs:
            start = s.request.num_computed_tokens
            end = start + s.num_new_tokens
            table = s.block_table
            ids.extend(s.request.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end))
            seq_lens.append(end)
            tables.append(table[: -(-end // BLOCK)])
            starts.append(starts[-1] + s.num_new_tokens)
        return runner._to_device(ids, positions, slots, tables, seq_lens, starts, 1)

    return old_build


def _decodes(context: int, num_blocks: int) -> list[SimpleNamespace]:
    rng = random.Random(0)
    seqs = []
    for i in range(NUM_SEQS):
        n = context - 1
        req = SimpleNamespace(request_id=f"r{i}", num_computed_tokens=n,
                              all_token_ids=list(range(n + 1)))  # fmt: skip
        table = rng.sample(range(num_blocks), -(-(n + 1) // BLOCK))
        seqs.append(SimpleNamespace(request=req, num_new_tokens=1, block_table=table))
    return seqs


def _advance(seqs: list[SimpleNamespace]) -> None:
    """One decode step later: one more token each, a new block where one fills up."""
    for s in seqs:
        s.request.num_computed_tokens += 1
        s.request.all_token_ids.append(0)
        if len(s.block_table) * BLOCK < s.request.num_computed_tokens + 1:
            s.block_table.append(len(s.block_table))


def engine_step_host(context: int, steps: int) -> dict[str, float]:
    """Median host milliseconds of one whole engine step (256 decodes at ``context`` tokens)
    on the CUDA runner's code path, by part, with the model forward left out: the forward
    returns a zero hidden state at once, so what is timed is what the host does around a GPU
    step (scheduling, inputs, logits selection, sampling, bookkeeping). The model is tiny
    (vocabulary 64), so the logits and argmax cost nothing here either."""
    from engine_svc.config import EngineConfig
    from engine_svc.engine import LLMEngine
    from protos.sampling import SamplingParams

    # Early requests decode while later ones prefill (chunked): enough tokens that none ends.
    max_tokens = -(-NUM_SEQS * context // 8192) + 2 * steps + 16
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64,
          "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": context + max_tokens + 16}  # fmt: skip
    cfg = ModelConfig.from_dict(hf, name="dummy")
    num_blocks = NUM_SEQS * (-(-(context + max_tokens + 16) // BLOCK))
    engine = LLMEngine(
        EngineConfig(load_format="dummy", dtype="float32", device="cpu", max_num_seqs=NUM_SEQS,
                     max_num_batched_tokens=max(8192, context), num_kv_blocks=num_blocks,
                     block_size=BLOCK, enable_prefix_caching=False, progress=False),
        model_config=cfg,
    )  # fmt: skip
    runner = cuda_runner.CudaModelRunner(
        engine.runner.model, cfg, torch.float32, BLOCK, NUM_SEQS, 8192, enforce_eager=True,
        device="cpu",
    )  # fmt: skip
    runner.init_kv_cache(1, engine.max_model_len)  # tables only; the forward is skipped
    runner._forward = lambda batch: torch.zeros(batch.input_ids.shape[0], cfg.hidden_size)
    engine.runner = runner
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(NUM_SEQS):
        engine.add_request(f"r{i}", [1 + (i + j) % 60 for j in range(context)], params)
    while (engine.last_step.num_seqs, engine.last_step.num_tokens) != (NUM_SEQS, NUM_SEQS):
        # the prefills (chunked), untimed: until a step is 256 decodes
        if not engine.has_unfinished_requests():
            raise RuntimeError("requests ended before every one was decoding")
        engine.step()

    timed = {
        "schedule": (engine.scheduler, "schedule"),
        "runner": (runner, "execute"),
        "of which inputs": (runner, "build_batch"),
        "sample": (engine, "_sample"),
        "update": (engine.scheduler, "update"),
    }
    parts: dict[str, list[float]] = {k: [] for k in [*timed, "whole step"]}
    clock = {k: 0.0 for k in timed}

    def wrap(name, obj, attr):
        fn = getattr(obj, attr)

        def timed_fn(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                clock[name] += time.perf_counter() - t

        setattr(obj, attr, timed_fn)

    for name, (obj, attr) in timed.items():
        wrap(name, obj, attr)
    for _ in range(steps):
        for k in clock:
            clock[k] = 0.0
        t = time.perf_counter()
        outs = engine.step()
        parts["whole step"].append(time.perf_counter() - t)
        if len(outs) != NUM_SEQS:
            raise RuntimeError(f"a decode step returned {len(outs)} outputs, not {NUM_SEQS}")
        for k, v in clock.items():
            parts[k].append(v)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--against", metavar="REV", help="also time the CUDA runner at this git rev")
    p.add_argument("--contexts", default="512,1024,4096", help="context lengths, comma-separated")
    p.add_argument("--steps", type=int, default=64, help="timed steps per context")
    p.add_argument("--engine-step", action="store_true",
                   help="time whole engine steps by part instead (model forward left out)")  # fmt: skip
    args = p.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    torch.set_num_threads(1)
    if args.engine_step:
        print(f"{NUM_SEQS} decodes per step, host time of a whole engine step without the "
              "model forward (ms, median by part)")  # fmt: skip
        for context in contexts:
            parts = engine_step_host(context, args.steps)
            print(f"  context {context}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
        return 0
    cfg = ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 2 * max(contexts),
    })  # fmt: skip
    model = dummy_model(cfg, torch.float32)
    num_blocks = NUM_SEQS * (-(-2 * max(contexts) // BLOCK))
    versions = {"this": cuda_runner}
    if args.against:
        versions[args.against] = _old_module(args.against)
    builders = {}
    for name, module in versions.items():
        runner = module.CudaModelRunner(
            model, cfg, torch.float32, BLOCK, NUM_SEQS, 8192, enforce_eager=True, device="cpu"
        )
        runner.init_kv_cache(1, 2 * max(contexts))  # tables only; the KV cache is not used
        builders[name] = _build_fn(runner)
    print(f"{NUM_SEQS} decodes per step, host time of building the step's inputs (ms, median)")
    for context in contexts:
        row = []
        for name, build in builders.items():
            seqs = _decodes(context, num_blocks)
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                build(seqs)
                times.append(time.perf_counter() - t)
                _advance(seqs)
            row.append(f"{name} {sorted(times)[len(times) // 2] * 1e3:.2f}")
        print(f"  context {context}: " + ", ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
