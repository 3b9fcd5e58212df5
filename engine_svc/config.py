"""Engine configuration: one dataclass, validated once, passed down through constructors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protos.errors import InvalidRequestError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}


# KV cache precision: "auto" = the model dtype; narrower caches hold more tokens per byte and
# read less per decode step. int8 has one float32 scale per token and KV head.
KV_CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
KV_CACHE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}

# Weight quantization applied at load: None (the weights in `dtype`) or "int8" (every linear
# layer's weight as int8 with one float32 scale per output channel, CPU engine only).
QUANTIZATIONS = (None, "int8")


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None  # HF-format directory or .gguf file; None = the default model
    dtype: str = "auto"  # auto: GPU bf16 (fp16 if unsupported); CPU bf16 if native, else fp32
    load_format: str = "auto"  # "auto" (weights from `model`) or "dummy" (random weights)
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes of KV cache (CPU); None = DEFAULT_KV_CACHE_MEMORY
    num_kv_blocks: int | None = None  # exact block count, overrides kv_cache_memory (tests)
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_waiting: int = 4096
    long_prefill_chunk: int | None = None  # see SchedulerConfig; None = max_num_batched_tokens/8
    enable_prefix_caching: bool = True
    seed: int = 0
    progress: bool = True  # progress bars on model fetch and load
    num_threads: int | None = None  # torch intra-op threads; None = torch's default
    device: str = "auto"  # auto: cuda when a GPU is visible, else cpu
    gpu_memory_utilization: float = 0.9  # CUDA: share of GPU memory for weights + KV + activations
    enforce_eager: bool = False  # CUDA: no decode CUDA graphs
    quantization: str | None = None  # "int8": weight-only int8 linear layers (CPU)
    kv_cache_dtype: str = "auto"  # auto (the model dtype), bfloat16, float16, int8 (CPU)

    def __post_init__(self) -> None:
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise InvalidRequestError(
                f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.load_format not in ("auto", "dummy"):
            raise InvalidRequestError(
                f"load_format must be auto or dummy, got {self.load_format!r}"
            )
        if self.block_size not in (8, 16, 32, 64, 128):
            raise InvalidRequestError(
                f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}"
            )
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.long_prefill_chunk is not None and self.long_prefill_chunk < 0:
            raise InvalidRequestError(
                f"long_prefill_chunk must be >= 0 (0 = off), got {self.long_prefill_chunk}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidRequestError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InvalidRequestError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InvalidRequestError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise InvalidRequestError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.quantization in ("none", ""):
            self.quantization = None
        if self.quantization not in QUANTIZATIONS:
            raise InvalidRequestError(
                f"quantization must be none or int8, got {self.quantization!r}"
            )
        self.kv_cache_dtype = KV_CACHE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
        if self.kv_cache_dtype == "fp8" or self.kv_cache_dtype.startswith("fp8_"):
            raise InvalidRequestError(
                f"kv_cache_dtype {self.kv_cache_dtype} is not supported yet (planned for the "
                "CUDA engine); choose auto, bfloat16, float16 or int8"
            )
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidRequestError(
                "kv_cache_dtype must be auto, bfloat16, float16 or int8, got "
                f"{self.kv_cache_dtype!r}"
            )
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise InvalidRequestError(
                f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}"
            )


DEFAULT_KV_CACHE_MEMORY = 2 * 1024**3


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmul is then several times faster than fp32 on the CPU."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return torch.device(name)


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    return model_dtype if name == "auto" else KV_CACHE_DTYPES[name]


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    if name == "auto":
        if device is not None and device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return DTYPES[name]
