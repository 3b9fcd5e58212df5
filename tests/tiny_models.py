"""Tiny random Llama-family checkpoints written with transformers, for exact comparisons."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_model(
    path: Path,
    *,
    arch: str = "llama",
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    tie: bool = False,
    qkv_bias: bool = False,
    rope_scaling: dict | None = None,
    vocab_size: int = 256,
    num_layers: int = 2,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Save a random model in HF format (config.json + model.safetensors) and return its dir."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=num_heads * head_dim,
        intermediate_size=2 * num_heads * head_dim + 32,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
        # Wider init than the default 0.02 so logits are not all near-equal: ties would make
        # greedy comparisons meaningless.
        initializer_range=0.2,
    )
    if arch == "llama":
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        if rope_scaling:
            rope = {**rope_scaling, "rope_theta": 500000.0}
        config = transformers.LlamaConfig(attention_bias=qkv_bias, rope_parameters=rope, **common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return path
