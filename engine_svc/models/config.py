"""What the engine needs to know about a Llama-family model, read from its config.json."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from protos.errors import ModelLoadError

log = logging.getLogger("pagedserve.engine")
ROPE_TYPES = ("default", "linear", "llama3")

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
}


@dataclass(slots=True, frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool  # Llama's attention_bias also puts a bias on o_proj; Qwen2's qkv bias does not
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    name: str = ""

    def attention_cost_per_context_token(self) -> float:
        """What one token of context adds to a prompt token's compute, relative to the token's
        linear layers: attention does 4 * head_size FLOPs per query head, layer and context
        token (Q K^T and P V); the linears 2 per weight (embedding and lm_head left out). About
        1 / 3,000 for SmolLM2-135M: at 3,000 tokens of context attention doubles a token's
        cost."""
        h, d = self.hidden_size, self.head_size
        qkv_o = h * (self.num_heads + self.num_kv_heads) * d * 2
        weights = self.num_layers * (qkv_o + 3 * h * self.intermediate_size)
        return (4 * d * self.num_heads * self.num_layers) / (2 * weights)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_dict(cls, cfg: dict, name: str = "", generation: dict | None = None) -> ModelConfig:
        by_type = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
        }
        archs = cfg.get("architectures") or [
            by_type.get(cfg.get("model_type"), cfg.get("model_type"))
        ]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {arch!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            num_heads = cfg["num_attention_heads"]
            hidden = cfg["hidden_size"]
            # transformers >= 5 writes rope_parameters (theta + scaling); older ones rope_scaling.
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind not in ROPE_TYPES:  # refused before any weight is read
                raise ModelLoadError(
                    f"rope scaling type {kind!r} is not supported ({', '.join(ROPE_TYPES)})"
                )
            eos = (generation or {}).get("eos_token_id", cfg.get("eos_token_id"))
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            return cls(
                architecture=arch,
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
                head_size=cfg.get("head_dim") or hidden // num_heads,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                rope_scaling=rope if kind != "default" else None,
                max_position_embeddings=_context_length(cfg, name),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
                o_bias=arch != "Qwen2ForCausalLM" and bool(cfg.get("attention_bias", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                name=name,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks required field {e}") from e

    @classmethod
    def from_dir(cls, path: Path) -> ModelConfig:
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{path} has no config.json (not a Hugging Face model directory)")
        cfg = json.loads(cfg_path.read_text())
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        return cls.from_dict(cfg, name=path.name, generation=gen)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V of one token over all layers; an int8 cache adds its float32 scale per
        token and KV head."""
        elem = torch.empty((), dtype=dtype).element_size()
        scales = 4 if dtype == torch.int8 else 0
        return 2 * self.num_layers * self.num_kv_heads * (self.head_size * elem + scales)


def _context_length(cfg: dict, name: str) -> int:
    """max_position_embeddings, capped at the sliding window of a model that uses one
    (Mistral 7B v0.1: 4096 of 32768; Qwen2 with use_sliding_window): this engine attends to
    the whole context, which is exact only while the context fits in the window."""
    length = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:  # Qwen2 names a window it does not use
        window = None
    if isinstance(window, int) and 0 < window < length:
        log.warning(
            "%s uses sliding-window attention over %d tokens, which this engine does not "
            "implement: its context is capped at %d tokens (of %d), where full attention is "
            "exact",
            name or "the model", window, window, length,
        )  # fmt: skip
        return window
    return length


def rope_cos_sin_cache(cfg: ModelConfig, max_position: int) -> torch.Tensor:
    """[max_position, head_size] float32: cos of each frequency, then sin (as HF computes them)."""
    dim = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind != "default":
        raise ModelLoadError(
            f"rope scaling type {kind!r} is not supported ({', '.join(ROPE_TYPES)})"
        )
    t = torch.arange(max_position, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
