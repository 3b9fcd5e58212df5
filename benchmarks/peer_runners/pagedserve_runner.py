"""pagedserve's offline engine (``engine_svc.LLM``) as a peer runner, run with the repo's venv.

Options: ``quantization`` (int8, with ``dtype`` the activations' precision) or none. Prefix caching is off (repeated runs of one workload would hit it; the peers run
with theirs off too). See runner_common.py for the job and result formats.
"""

from __future__ import annotations

from collections.abc import Sequence

from runner_common import Job, run


class Pagedserve:
    def __init__(self, job: Job) -> None:
        import torch

        import engine_svc
        from engine_svc import LLM

        quant = job.options.get("quantization")
        self.llm = LLM(
            model=job.model,
            dtype=job.options.get("dtype", job.dtype),
            quantization=quant,
            num_threads=job.threads,
            kv_cache_memory=int(job.kv_cache_gib * 1024**3),
            max_num_seqs=job.max_num_seqs,
            max_num_batched_tokens=job.max_num_batched_tokens,
            enable_prefix_caching=False,
            progress=False,
        )
        self._params = engine_svc.SamplingParams
        engine = self.llm.engine
        self.version = f"pagedserve ({_git_describe()}), torch {torch.__version__}"
        self.precision = str(engine.dtype).removeprefix("torch.")
        if quant:
            self.precision = f"{quant} weights, {self.precision} activations"
        self.details = (
            f"{torch.get_num_threads()} torch threads, KV {job.kv_cache_gib:g} GiB "
            f"({engine.block_manager.num_blocks} blocks of {engine.block_manager.block_size}), "
            f"max_num_seqs {job.max_num_seqs}, max_num_batched_tokens "
            f"{job.max_num_batched_tokens}, prefix caching off"
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], output_lens: Sequence[int]
    ) -> list[list[int]]:
        params = [self._params(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
        outs = self.llm.generate([list(p) for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    def close(self) -> None:
        pass


def _git_describe() -> str:
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown commit"
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"


if __name__ == "__main__":
    raise SystemExit(run(Pagedserve))
