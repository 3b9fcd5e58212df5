"""C++ kernels for the CPU path, built once with torch's cpp_extension (sources in csrc/).

- ``paged_decode`` (csrc/paged_decode.cpp): decode attention that reads K/V blocks in place
  (the cache in the query's dtype, bfloat16, float16 or int8 with per-token-head scales).
  On the CPU, torch has no op that reads K/V through a block table: the plain-torch path
  first copies every sequence's blocks out of the paged cache (``index_select``) and then
  runs two matmuls, so each step moves the whole context three times. The kernel computes,
  per (sequence, KV head), the scores of the head's query group, a float32 online softmax and
  the weighted sum of V, reading each block once. Same math as
  ``kernels.reference.paged_attention`` for one query token per sequence (tested against it).
- ``packed_linear`` (csrc/packed_linear.cpp, AVX-512 or AVX2 + FMA): linear layers over
  weights packed once into column panels (``pack_weight``), float32, or int8 with one scale per
  output column (``quantize_int8``, weight-only quantization); batch-invariant. ``PackedLinear``
  is the module.
- ``paged_prefill`` (csrc/paged_prefill.cpp): attention of a prompt chunk to its cached prefix
  and itself, flash-attention order (float32 online softmax over key tiles gathered from the
  blocks), so no [rows, context] score block is written and read back; same math as the
  reference for a chunk of ``n`` query tokens (tested against it).
- ``write_kv_`` (csrc/kv_cache.cpp): new tokens' K and V into their cache slots, converted to
  the cache's dtype (``--kv-cache-dtype``).
- ``rms_norm``, ``add_rms_norm_``, ``rotary_``, ``silu_mul`` (csrc/elementwise.cpp): the
  layer's element-wise ops fused, float32 (the model runs on them through
  ``engine_svc.runner.cpu_model_ops.FusedCpuOps``).
- ``DecodeStack`` (csrc/decode_stack.cpp): every decoder layer of a decode-only step in one
  call, the ops above in the order ``LlamaModel.forward`` runs them, without the Python in
  between (bit-identical hidden states; ``decode_stack()`` builds it from a packed model).

They are built at install (``scripts/setup.sh`` and the Docker image run ``pagedserve
build-kernels``, which calls ``load()``) into torch's extension cache, and loaded from there at
every engine start; an engine that finds no build for this CPU, torch and source version
builds it first, and says so. All optional: when the build fails (no compiler, no ninja) or
``PAGEDSERVE_CPU_KERNEL=0`` is set, ``load()`` returns None (``load_error()`` says why) and the
engine keeps the plain-torch path; without AVX-512 or AVX2 + FMA ``packed_linear_supported()`` is
false and torch's linear layers stay.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("pagedserve.engine")

CSRC = Path(__file__).with_name("csrc")
SOURCES = (
    "paged_decode.cpp",
    "paged_prefill.cpp",
    "kv_cache.cpp",
    "packed_linear.cpp",
    "elementwise.cpp",
    "decode_stack.cpp",
    "bindings.cpp",
)
# -fopenmp: at::parallel_for is serial without it. It links libgomp.so.1, which resolves to the
# copy torch has already loaded (one thread pool). -march=native: the build is tied to this CPU,
# so the CPU's flags are part of the build name (a cache copied to another CPU rebuilds).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
_lock = threading.Lock()
_module = None
_tried = False
_ready = False  # load() has decided (module or None): later calls skip the lock
_error: str | None = None  # why the last load() found no kernels


def build_name(sources: list[str]) -> str:
    """Changes whenever a source, the flags or the CPU changes."""
    h = hashlib.sha256()
    for text in sources:
        h.update(text.encode())
    h.update(" ".join(CFLAGS).encode())
    h.update(_cpu_flags().encode())
    return f"pagedserve_cpu_ops_{h.hexdigest()[:16]}"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_path() -> Path:
    """The shared library of this CPU, torch and source version (it may not exist yet)."""
    from torch.utils import cpp_extension

    name = build_name([(CSRC / f).read_text() for f in SOURCES])
    return Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so"


def load_error() -> str | None:
    """Why ``load()`` returned None (disabled, or the build failed), else None."""
    return _error


def load():
    """The compiled module, or None when it cannot be built (the torch path is used then).
    Called on the step's hot path (the KV write of every layer): once decided, no lock."""
    if _ready:
        return _module
    with _lock:
        try:
            return _load_locked()
        finally:
            _set_ready()


def _set_ready() -> None:
    global _ready
    _ready = True


def _load_locked():
    """load()'s work, under ``_lock``: build or load the module once."""
    global _module, _tried, _error
    if _tried:
        return _module
    _tried = True
    if os.environ.get("PAGEDSERVE_CPU_KERNEL", "1") == "0":
        _error = "disabled by PAGEDSERVE_CPU_KERNEL=0"
        return None
    try:
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import load_inline

        sources = [(CSRC / f).read_text() for f in SOURCES]
        name = build_name(sources)
        build_dir = cpp_extension._get_build_directory(name, False)
        with build_lock(build_dir):
            if os.path.exists(os.path.join(build_dir, f"{name}.so")):
                log.info("loading the CPU kernels built in %s", build_dir)
            else:  # not built at install (or for another CPU, torch or source version)
                log.warning(
                    "building the C++ CPU kernels now, about a minute, once (install runs "
                    "`pagedserve build-kernels` to do it ahead): %s",
                    build_dir,
                )
            _module = load_inline(
                name=name,
                cpp_sources=sources,  # bindings.cpp binds them (GIL released)
                extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
    except Exception as e:  # no compiler or ninja: keep the plain-torch path
        _error = _short(e)
        log.warning("CPU kernels unavailable (%s); using the torch path", _error)
        _module = None
    return _module


def _short(e: Exception) -> str:
    """A failed build's cause in a line or two: the compiler's own error lines (torch's message
    repeats every command line of the build)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    causes = [ln for ln in lines if "error" in ln.lower() or "not found" in ln]
    causes = [ln for ln in causes if not ln.startswith("Error building extension")]
    text = "; ".join(causes[:3] or lines[:1] or [type(e).__name__])
    return text if len(text) <= 400 else text[:397] + "..."


@contextlib.contextmanager
def build_lock(build_dir: str):
    """One build at a time per build directory, across processes (data-parallel replicas
    starting together), by a flock the kernel drops when its holder dies. While it is held,
    torch's own lock file can only be a leftover of a build that was killed (SIGKILL, the OOM
    killer): torch would wait on it forever, so it goes."""
    os.makedirs(build_dir, exist_ok=True)
    fd = os.open(os.path.join(build_dir, "pagedserve.flock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        leftover = os.path.join(build_dir, "lock")
        if os.path.exists(leftover):
            log.warning("removing %s, left by a kernel build that died", leftover)
            os.remove(leftover)
        yield
    finally:
        os.close(fd)  # releases the flock


def paged_decode(
    query: torch.Tensor,  # [n, num_heads, head_size]: one query token per sequence
    key_cache: torch.Tensor,  # [num_kv_heads, num_blocks, block_size, head_size]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [n, max_blocks] int64
    seq_lens: torch.Tensor,  # [n] int64, context length including the new token
    scale: float,
    key_scales: torch.Tensor | None = None,  # int8 caches: [num_kv_heads, num_blocks, block_size]
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # [n, num_heads, head_size]
    """The cache in the query's dtype, bfloat16, float16, or int8 with its scales."""
    return _module.paged_decode(
        query, key_cache, value_cache, block_tables, seq_lens, scale, key_scales, value_scales
    )


def paged_prefill(
    query: torch.Tensor,  # [n, num_heads, head_size]: a prompt chunk, heads packed, rows of any stride
    key_cache: torch.Tensor,  # [num_kv_heads, num_blocks, block_size, head_size]
    value_cache: torch.Tensor,
    blocks: torch.Tensor,  # [>= ceil(seq_len / block_size)] int64: the sequence's block table
    seq_len: int,  # context length after the chunk (the chunk is its last n tokens)
    scale: float,
    key_scales: torch.Tensor | None = None,  # int8 caches: [num_kv_heads, num_blocks, block_size]
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # [n, num_heads, head_size]
    """Causal attention of a chunk to its cached prefix and itself; the chunk's K and V are in
    the cache already. head_size a multiple of 16."""
    return _module.paged_prefill(
        query, key_cache, value_cache, blocks, seq_len, scale, key_scales, value_scales
    )


def write_kv_(
    key: torch.Tensor,  # [n, num_kv_heads, head_size], heads packed, rows of any stride
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_kv_heads, num_blocks, block_size, head_size]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [n] int64
    key_scales: torch.Tensor | None = None,  # int8 caches: [num_kv_heads, num_blocks, block_size]
    value_scales: torch.Tensor | None = None,
) -> None:
    """Each token's K and V to its slot, converted to the cache's dtype (int8: quantized per
    token and head, as ``kernels.reference.quantize_kv_int8``)."""
    _module.write_kv_(key, value, key_cache, value_cache, slot_mapping, key_scales, value_scales)


def packed_linear_supported() -> bool:
    m = load()
    return m is not None and m.packed_linear_supported()


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` [n, ...] zero-padded to ``rows`` rows, float32 (int8 stays int8), contiguous."""
    out = torch.zeros(rows, *t.shape[1:], dtype=t.dtype)
    out[: t.shape[0]] = t
    return out


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] (nn.Linear layout) -> [ceil(N / NR), K, NR] column panels, zero-padded; float32,
    or int8 as it comes (``quantize_int8``'s output)."""
    nr = load().packed_linear_panel_width()
    n, k = weight.shape
    w = weight.detach()
    w = w if w.dtype == torch.int8 else w.float()
    panels = -(-n // nr)
    return _pad_rows(w, panels * nr).view(panels, nr, k).transpose(1, 2).contiguous()


def pad_panels(v: torch.Tensor) -> torch.Tensor:
    """A per-output-column vector [N] (bias, scale) as the kernel reads it: float32, padded to
    whole panels."""
    nr = load().packed_linear_panel_width()
    return _pad_rows(v.detach().float(), -(-v.shape[0] // nr) * nr)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [N, K] int8, scale [N] float32) with
    ``weight ~= q * scale[:, None]``; the row's largest magnitude maps to 127 (an all-zero row
    gets scale 1)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def packed_linear(
    x: torch.Tensor,  # [M, K] float32, contiguous
    packed: torch.Tensor,  # pack_weight(W), float32 or int8
    out_features: int,
    bias: torch.Tensor | None = None,  # pad_panels(b)
    scale: torch.Tensor | None = None,  # pad_panels(s), for an int8 weight only
) -> torch.Tensor:  # [M, N] = x @ (W * s)^T + b
    return _module.packed_linear(x, packed, out_features, bias, scale)


class PackedLinear(nn.Module):
    """Drop-in for an ``nn.Linear`` on the CPU: the weight lives only in packed form, float32
    or (``int8=True``) int8 with per-output-channel scales. Any input dtype: the kernel runs in
    float32 and the output comes back in the input's dtype."""

    def __init__(self, linear: nn.Linear, int8: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = None
        if int8:
            q, s = quantize_int8(linear.weight)
            self.register_buffer("packed", pack_weight(q), persistent=False)
            scale = pad_panels(s)
        else:
            self.register_buffer("packed", pack_weight(linear.weight), persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        bias = None if linear.bias is None else pad_panels(linear.bias)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        y = packed_linear(
            rows.float().contiguous(), self.packed, self.out_features, self.bias, self.scale
        )
        return y.to(x.dtype).view(*lead, self.out_features)


def pack_linears(model: nn.Module, int8: bool = False) -> int:
    """Replace every ``nn.Linear`` of ``model`` (float32 ones only unless ``int8``) by a
    ``PackedLinear``; returns how many. The original weights are dropped (unless shared, e.g.
    an lm_head tied to the embedding)."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and (int8 or child.weight.dtype == torch.float32)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child, int8))
    return len(swaps)


def fused_ops_available(dtype: torch.dtype) -> bool:
    """The fused element-wise ops (float32 only) can be used for a model of ``dtype``."""
    return dtype == torch.float32 and load() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _module.rms_norm(x, weight, eps)


def add_rms_norm_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``residual += x`` in place; returns the RMSNorm of the new residual."""
    return _module.add_rms_norm_(x, residual, weight, eps)


def rotary_(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_size: int
) -> None:
    """Rotate, in place, the first ``heads`` heads of each row of ``qkv`` [rows, cols]; cos and
    sin are [rows, head_size]."""
    _module.rotary_(qkv, cos, sin, heads, head_size)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2 * inter] -> silu(gate) * up, [rows, inter]."""
    return _module.silu_mul(gate_up)


def decode_stack(model: nn.Module):
    """A ``DecodeStack`` over ``model``'s decoder layers, or None where the model does not run
    on the fused float32 ops with every linear layer packed (then the Python forward runs
    every step). ``model`` is an ``engine_svc.models.llama.LlamaModel`` after
    ``pack_linears``; the stack shares its tensors (no copy)."""
    m = load()
    layers = list(getattr(model, "layers", []))
    if m is None or not layers:
        return None
    cfg = model.cfg
    packed, scales, biases, outs = [], [], [], []
    none = torch.empty(0)
    for layer in layers:
        for lin in (
            layer.self_attn.qkv_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_up_proj,
            layer.mlp.down_proj,
        ):
            if not isinstance(lin, PackedLinear):
                return None
            packed.append(lin.packed)
            scales.append(none if lin.scale is None else lin.scale)
            biases.append(none if lin.bias is None else lin.bias)
            outs.append(lin.out_features)
    norms = [layer.input_layernorm.weight for layer in layers]
    norms += [layer.post_attention_layernorm.weight for layer in layers]
    norms.append(model.norm.weight)
    if any(w.dtype != torch.float32 for w in norms):
        return None
    n = len(layers)
    return m.DecodeStack(
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_size,
        cfg.rms_norm_eps,
        layers[0].self_attn.scale,
        [w.detach() for w in norms[:n]],
        [w.detach() for w in norms[n : 2 * n]],
        norms[-1].detach(),
        packed,
        scales,
        biases,
        outs,
    )
