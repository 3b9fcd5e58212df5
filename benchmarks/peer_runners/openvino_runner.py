"""OpenVINO GenAI's ``ContinuousBatchingPipeline`` on token-id inputs, run with its venv.

Options: ``ov_model`` (required): the OpenVINO IR directory that ``optimum-cli export openvino``
wrote (benchmarks/peers_setup.sh). The job's dtype becomes the CPU plugin's
``INFERENCE_PRECISION_HINT`` (f32 / bf16) and its KV cache precision; the threads become
``INFERENCE_NUM_THREADS``. Prefix caching off. See runner_common.py for the formats.
"""

from __future__ import annotations

from collections.abc import Sequence

from runner_common import Job, run

OV_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
OV_NAMES = {v: k for k, v in OV_PRECISION.items()}


class OpenVino:
    def __init__(self, job: Job) -> None:
        import numpy as np
        import openvino as ov
        import openvino_genai as ov_genai

        model = job.options.get("ov_model")
        if not model:
            raise SystemExit("openvino runner: options.ov_model (the exported IR) is required")
        self._np, self._ov, self._genai = np, ov, ov_genai
        sc = ov_genai.SchedulerConfig()
        sc.cache_size = max(1, round(job.kv_cache_gib))  # GB, whole numbers
        sc.max_num_seqs = job.max_num_seqs
        sc.max_num_batched_tokens = job.max_num_batched_tokens
        sc.dynamic_split_fuse = True  # chunked prefill mixed with decodes, as the others do
        sc.enable_prefix_caching = False
        hint = OV_PRECISION[job.dtype]
        # What the plugin runs for this hint here (bf16 falls back to f32 without native bf16
        # hardware), read back from a plugin set the same way; the KV cache is kept at that
        # precision (the CPU default is u8, a quantized cache the other systems do not use).
        core = ov.Core()
        core.set_property("CPU", {"INFERENCE_PRECISION_HINT": hint})
        got = _ov_type_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
        kv_default = _ov_type_name(core.get_property("CPU", "KV_CACHE_PRECISION"))
        props = {
            "INFERENCE_PRECISION_HINT": hint,
            "KV_CACHE_PRECISION": got,
            "INFERENCE_NUM_THREADS": job.threads,
        }
        self.pipe = ov_genai.ContinuousBatchingPipeline(model, sc, "CPU", props)
        self.version = f"openvino {ov.__version__}, openvino-genai {ov_genai.__version__}"
        self.precision = OV_NAMES.get(got, got) + ", fp16 IR weights"
        self.details = (
            f"INFERENCE_PRECISION_HINT {hint} (ran {got}), KV cache {got} (its default here: "
            f"{kv_default}), INFERENCE_NUM_THREADS {job.threads}, KV cache {sc.cache_size} GB, "
            f"max_num_seqs {sc.max_num_seqs}, max_num_batched_tokens "
            f"{sc.max_num_batched_tokens}, dynamic_split_fuse on, prefix caching off"
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], output_lens: Sequence[int]
    ) -> list[list[int]]:
        np, ov = self._np, self._ov
        inputs = [ov.Tensor(np.asarray([p], dtype=np.int64)) for p in prompts]
        configs = []
        for n in output_lens:
            gc = self._genai.GenerationConfig()
            gc.max_new_tokens = n
            gc.min_new_tokens = n
            gc.ignore_eos = True
            gc.do_sample = False
            configs.append(gc)
        results = self.pipe.generate(inputs, configs)
        return [list(r.m_generation_ids[0]) for r in results]

    def close(self) -> None:
        del self.pipe


def _ov_type_name(t: object) -> str:
    """``ov.Type`` -> its short name ("f32", "bf16", "u8")."""
    get = getattr(t, "get_type_name", None)
    return str(get() if get else t)


if __name__ == "__main__":
    raise SystemExit(run(OpenVino))
