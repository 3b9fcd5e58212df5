"""Build a Llama-family model from a Hugging Face directory (safetensors) or random weights."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine_svc.models.config import ModelConfig
from engine_svc.models.llama import LlamaModel
from protos.errors import ModelLoadError

# HF name -> (our fused parameter, index of the part inside it)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} holds no .safetensors weights")
    return files


def _iter_tensors(files: list[Path], progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    handles = [safe_open(str(f), framework="pt") for f in files]
    names = [(h, n) for h in handles for n in h.keys()]  # noqa: SIM118 (safe_open is not a dict)
    for h, name in tqdm(names, desc="Loading weights", unit="tensor", disable=not progress):
        yield name, h.get_tensor(name)


def load_model(
    path: Path, cfg: ModelConfig, dtype: torch.dtype, progress: bool = True
) -> LlamaModel:
    """Load weights into a model built on the meta device (no double allocation)."""
    with torch.device("meta"):
        model = LlamaModel(cfg)
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in _iter_tensors(_safetensors_files(path), progress):
        t = t.to(dtype)
        m = _LAYER.match(name)
        if m and m.group(2) in _FUSED:
            fused, idx = _FUSED[m.group(2)]
            parts.setdefault(f"layers.{m.group(1)}.{fused}.{m.group(3)}", {})[idx] = t
        elif name.startswith("model."):
            state[name[len("model.") :]] = t
        elif name == "lm_head.weight":
            state[name] = t
        # Other tensors (e.g. rotary inv_freq buffers of old checkpoints) are not weights.
    for key, p in parts.items():
        want = 3 if ".qkv_proj." in key else 2
        if len(p) != want:
            raise ModelLoadError(f"checkpoint is missing parts of {key}")
        state[key] = torch.cat([p[i] for i in range(want)], dim=0)
    if cfg.tie_word_embeddings or "lm_head.weight" not in state:
        if "embed_tokens.weight" not in state:
            raise ModelLoadError("checkpoint has no model.embed_tokens.weight")
        state["lm_head.weight"] = state["embed_tokens.weight"]
    _check_and_assign(model, state)
    return model


def dummy_model(
    cfg: ModelConfig, dtype: torch.dtype, seed: int = 0, device: torch.device | str = "cpu"
) -> LlamaModel:
    """Random weights of the right shapes, for benchmarks (--load-format dummy); made directly
    on ``device`` (an 8B model's weights are drawn in seconds on a GPU, minutes on a CPU)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            state[name] = torch.ones(p.shape, dtype=dtype, device=device)
        else:
            w = torch.randn(p.shape, generator=gen, device=device)
            state[name] = (w * 0.02).to(dtype)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    _check_and_assign(model, state)
    return model


def _check_and_assign(model: LlamaModel, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
    for name, t in state.items():
        if name not in expected:
            raise ModelLoadError(f"unexpected tensor {name!r} in checkpoint")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ModelLoadError(
                f"tensor {name} has shape {tuple(t.shape)}, config implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, assign=True)
    model.eval()
    model.requires_grad_(False)
