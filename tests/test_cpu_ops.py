"""The C++ CPU kernels (engine_svc.runner.cpu_ops) against plain torch.

Decode attention against ``kernels.reference.paged_attention``: random inputs each run (seed
printed), blocks that no sequence owns are filled with NaN (a read out of range would poison
the output), GQA ratios with and without a compiled specialisation, head sizes 64/128 and an
odd one, block sizes 16/32, float32 and bfloat16, and one case with block ids near the top of
a large cache.

Packed linear against a float64 matmul: shapes around every tile and panel edge, bias or not,
batch invariance (bit-identical rows whatever the batch), refused bad inputs, and the engine
using it.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
import torch
from torch import nn

from engine_svc.config import EngineConfig
from engine_svc.engine import LLMEngine
from engine_svc.models.config import ModelConfig
from engine_svc.runner import cpu_ops
from kernels import reference
from protos.errors import InvalidRequestError
from protos.sampling import SamplingParams

pytestmark = pytest.mark.skipif(
    cpu_ops.load() is None, reason="the C++ CPU kernel could not be built here"
)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def _case(num_heads, kv_heads, head_size, block_size, dtype, lens, num_blocks, high_ids, gen):
    need = sum(-(-n // block_size) for n in lens)
    ids = (
        list(range(num_blocks - need, num_blocks))
        if high_ids
        else torch.randperm(num_blocks, generator=gen)[:need].tolist()
    )
    tables, i = [], 0
    for n in lens:
        k = -(-n // block_size)
        tables.append(ids[i : i + k])
        i += k
    # Heads-outer engine layout; NaN in every block no sequence owns.
    kc = torch.full((kv_heads, num_blocks, block_size, head_size), float("nan"), dtype=dtype)
    vc = kc.clone()
    owned = torch.tensor(ids)
    kc[:, owned] = torch.randn(kv_heads, len(ids), block_size, head_size, generator=gen).to(dtype)
    vc[:, owned] = torch.randn(kv_heads, len(ids), block_size, head_size, generator=gen).to(dtype)
    q = torch.randn(len(lens), num_heads, head_size, generator=gen).to(dtype)
    width = max(len(t) for t in tables)
    # Rows are padded with a block nobody owns (all NaN), so reading padding poisons the output.
    pad = next((b for b in range(num_blocks) if b not in set(ids)), 0)
    bt = torch.tensor([t + [pad] * (width - len(t)) for t in tables], dtype=torch.int64)
    return q, kc, vc, bt, torch.tensor(lens, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(
    "num_heads,kv_heads,head_size",
    # group sizes 1, 2, 3, 4, 8 (compiled specialisations) and 5, 6, 7 (generic)
    [
        (9, 3, 64),
        (4, 4, 128),
        (8, 4, 128),
        (8, 2, 64),
        (8, 1, 64),
        (6, 1, 128),
        (10, 2, 48),
        (14, 2, 64),
    ],
)
@pytest.mark.parametrize("path", ["fast", "generic"])
def test_matches_reference(num_heads, kv_heads, head_size, block_size, dtype, path, kernel_path):
    kernel_path(path)
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    lens = [1, 2, block_size, block_size + 1, 3 * block_size - 1, 200]
    q, kc, vc, bt, sl = _case(
        num_heads, kv_heads, head_size, block_size, dtype, lens, 64, False, gen
    )
    _check(q, kc, vc, bt, sl, dtype, seed)


@pytest.fixture
def kernel_path():
    """Choose the decode kernel's path: "fast" (AVX-512 float32 where built) or "generic"."""
    module = cpu_ops.load()
    yield lambda path: module.use_generic_decode(path == "generic")
    module.use_generic_decode(False)


@pytest.mark.parametrize("block_size", [8, 16, 48])
@pytest.mark.parametrize("path", ["fast", "generic"])
def test_block_sizes_off_the_chunk(block_size, path, kernel_path):
    """The fast path walks blocks in chunks of up to 16 tokens: blocks smaller than a chunk
    and blocks that are not a multiple of it."""
    kernel_path(path)
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    lens = [1, 7, block_size, 2 * block_size + 3, 150]
    q, kc, vc, bt, sl = _case(9, 3, 64, block_size, torch.float32, lens, 64, False, gen)
    _check(q, kc, vc, bt, sl, torch.float32, seed)


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_nan_in_context_reaches_the_output(path, kernel_path):
    """A NaN in K inside a sequence's context (an upstream blow-up) must show, not vanish."""
    kernel_path(path)
    gen = torch.Generator().manual_seed(0)
    q, kc, vc, bt, sl = _case(9, 3, 64, 16, torch.float32, [40, 40], 16, False, gen)
    kc[1, bt[0, 1], 3] = float("nan")  # KV head 1, token 19 of sequence 0
    out = cpu_ops.paged_decode(q, kc, vc, bt, sl, 0.125)
    assert out[0, 3:6].isnan().all()  # the query heads of KV head 1
    assert not out[0, :3].isnan().any() and not out[1].isnan().any()


def test_large_block_ids():
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    q, kc, vc, bt, sl = _case(8, 2, 64, 16, torch.float32, [700, 33], 40_000, True, gen)
    assert bt.max().item() == 39_999
    _check(q, kc, vc, bt, sl, torch.float32, seed)


def _check(q, kc, vc, bt, sl, dtype, seed):
    scale = q.shape[2] ** -0.5
    out = cpu_ops.paged_decode(q, kc, vc, bt, sl, scale)
    # The reference uses the block-major layout [blocks, block_size, kv_heads, head_size].
    qsl = torch.arange(len(sl) + 1, dtype=torch.int32)
    ref = reference.paged_attention(
        q, kc.permute(1, 2, 0, 3), vc.permute(1, 2, 0, 3), bt, sl, qsl, scale
    )
    assert not out.isnan().any(), f"seed={seed}: read a block it does not own"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol, msg=f"seed={seed}")


def test_bad_tables_are_refused_not_read():
    gen = torch.Generator().manual_seed(0)
    q, kc, vc, bt, sl = _case(4, 2, 64, 16, torch.float32, [20, 5], 8, False, gen)
    with pytest.raises(RuntimeError, match="block id out of range"):
        cpu_ops.paged_decode(q, kc, vc, bt.clone().fill_(99), sl, 0.125)
    with pytest.raises(RuntimeError, match="seq_lens"):
        cpu_ops.paged_decode(q, kc, vc, bt, sl + 1000, 0.125)


def _tiny_llama(vocab_size, hidden_size, intermediate_size, num_hidden_layers, **extra):
    """A small random Llama config: 4 query heads over 2 KV heads."""
    return ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            **extra,
        }
    )


# -- packed linear -------------------------------------------------------------------------------

needs_packed = pytest.mark.skipif(
    not cpu_ops.packed_linear_supported(), reason="packed_linear needs AVX-512 or AVX2 + FMA"
)


@needs_packed
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [1, 7, 64, 577])
@pytest.mark.parametrize("n", [1, 16, 17, 31, 32, 33, 100])
def test_packed_linear_matches_float64(n, k, bias):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    packed = cpu_ops.pack_weight(w)
    # Row counts around the 12-row tile and the 192-row chunk.
    for m in (0, 1, 5, 12, 13, 25, 192, 193, 400):
        x = torch.randn(m, k, generator=gen)
        got = cpu_ops.packed_linear(x, packed, n, None if b is None else cpu_ops.pad_panels(b))
        want = x.double() @ w.double().T + (0 if b is None else b.double())
        assert got.shape == (m, n)
        torch.testing.assert_close(
            got.double(), want, rtol=1e-5, atol=1e-5 * k**0.5, msg=f"seed={seed} m={m}"
        )


@needs_packed
def test_packed_linear_model_shapes_and_lm_head():
    """The default model's shapes (K 576/1536, N 960/3072/576 and a 49,152-row lm_head)."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    for n, k in ((960, 576), (3072, 576), (576, 1536), (49152, 576)):
        w = torch.randn(n, k, generator=gen) * 0.05
        x = torch.randn(37, k, generator=gen)
        got = cpu_ops.packed_linear(x, cpu_ops.pack_weight(w), n)
        torch.testing.assert_close(got.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-4)


@needs_packed
def test_packed_linear_is_batch_invariant():
    """A row's output is bit-identical alone, at any position of any batch size."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    w = torch.randn(100, 300, generator=gen)
    packed = cpu_ops.pack_weight(w)
    x = torch.randn(230, 300, generator=gen)
    full = cpu_ops.packed_linear(x, packed, 100)
    for i in (0, 11, 12, 191, 192, 229):
        assert torch.equal(cpu_ops.packed_linear(x[i : i + 1], packed, 100)[0], full[i])
    for m in (3, 13, 77):
        assert torch.equal(cpu_ops.packed_linear(x[50 : 50 + m], packed, 100), full[50 : 50 + m])


@needs_packed
def test_packed_linear_refuses_bad_input():
    packed = cpu_ops.pack_weight(torch.randn(40, 8))
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_ops.packed_linear(x.double(), packed, 40)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_ops.packed_linear(torch.randn(8, 3).T, packed, 40)
    with pytest.raises(RuntimeError, match="columns"):
        cpu_ops.packed_linear(torch.randn(3, 9), packed, 40)
    with pytest.raises(RuntimeError, match="panels"):
        cpu_ops.packed_linear(x, packed, 70)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_ops.packed_linear(x, packed, 40, torch.randn(39))


def _dequantized(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, scale = cpu_ops.quantize_int8(w)
    return q, scale, q.double() * scale.double()[:, None]


def test_quantize_int8_rounds_each_row_to_its_own_scale():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    w = torch.randn(50, 70, generator=gen) * torch.logspace(-3, 1, 50)[:, None]
    w[7] = 0  # an all-zero row
    q, scale, deq = _dequantized(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (50,)
    assert q.abs().max() <= 127
    assert scale[7] == 1 and not q[7].any()
    rows = [i for i in range(50) if i != 7]
    assert (q[rows].abs().amax(dim=1) == 127).all()  # each row's largest maps to +-127
    err = (deq - w.double()).abs()
    assert (err <= scale.double()[:, None] / 2 + 1e-12).all()  # round to nearest


@needs_packed
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [1, 7, 577])
@pytest.mark.parametrize("n", [1, 16, 17, 33, 100])
def test_packed_linear_int8_matches_float64_of_dequantized(n, k, bias):
    """int8 weights are widened exactly in registers: the result is the float32 sum over the
    dequantized weight, so it matches float64 to float32 rounding, not to int8 rounding."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    q, scale, deq = _dequantized(torch.randn(n, k, generator=gen))
    b = torch.randn(n, generator=gen) if bias else None
    packed = cpu_ops.pack_weight(q)
    assert packed.dtype == torch.int8
    for m in (0, 1, 5, 6, 7, 13, 193, 400):
        x = torch.randn(m, k, generator=gen)
        got = cpu_ops.packed_linear(
            x,
            packed,
            n,
            None if b is None else cpu_ops.pad_panels(b),
            cpu_ops.pad_panels(scale),
        )
        want = x.double() @ deq.T + (0 if b is None else b.double())
        assert got.shape == (m, n)
        torch.testing.assert_close(
            got.double(), want, rtol=1e-5, atol=1e-5 * k**0.5, msg=f"seed={seed} m={m}"
        )


@needs_packed
def test_packed_linear_int8_is_batch_invariant():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    q, scale, _ = _dequantized(torch.randn(100, 300, generator=gen))
    packed, s = cpu_ops.pack_weight(q), cpu_ops.pad_panels(scale)
    x = torch.randn(230, 300, generator=gen)
    full = cpu_ops.packed_linear(x, packed, 100, None, s)
    for i in (0, 5, 6, 191, 192, 229):
        assert torch.equal(cpu_ops.packed_linear(x[i : i + 1], packed, 100, None, s)[0], full[i])


@needs_packed
def test_packed_linear_int8_refuses_bad_scales():
    q, scale = cpu_ops.quantize_int8(torch.randn(40, 8))
    packed, x = cpu_ops.pack_weight(q), torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="scales"):
        cpu_ops.packed_linear(x, packed, 40)  # int8 without scales
    with pytest.raises(RuntimeError, match="scales"):
        cpu_ops.packed_linear(x, cpu_ops.pack_weight(torch.randn(40, 8)), 40, None, scale)
    with pytest.raises(RuntimeError, match="scale must be"):
        cpu_ops.packed_linear(x, packed, 40, None, scale)  # not padded to whole panels
    with pytest.raises(RuntimeError, match="float32 or int8"):
        cpu_ops.packed_linear(x, cpu_ops.pack_weight(torch.randn(40, 8)).double(), 40)


@needs_packed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_packed_linear_module_keeps_the_input_dtype(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 40).to(dtype)
    _, _, deq = _dequantized(lin.weight.float())
    x = torch.randn(2, 3, 64).to(dtype)
    want = x.double() @ deq.T + lin.bias.double()
    mod = cpu_ops.PackedLinear(lin, int8=True)
    got = mod(x)
    assert got.dtype == dtype and got.shape == (2, 3, 40)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@needs_packed
def test_pack_linears_swaps_float32_layers_only():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 24)
    model = nn.ModuleDict(
        {
            "a": nn.Linear(24, 40),
            "b": nn.Linear(40, 24, bias=False),
            "head": nn.Linear(24, 50, bias=False),
            "low": nn.Linear(24, 24).to(torch.bfloat16),
            "emb": emb,
        }
    )
    model["head"].weight = emb.weight  # tied, like a small Llama's lm_head
    x = torch.randn(5, 24)
    want = model["head"](model["b"](model["a"](x)))
    assert cpu_ops.pack_linears(model) == 3
    assert isinstance(model["a"], cpu_ops.PackedLinear)
    assert type(model["low"]) is nn.Linear
    got = model["head"](model["b"](model["a"](x)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model["emb"].weight is emb.weight  # the embedding keeps the tied weight
    assert model["a"](x[None]).shape == (1, 5, 40)  # leading dims kept


@needs_packed
def test_float32_engine_packs_every_linear():
    cfg = dict(load_format="dummy", num_kv_blocks=16, progress=False)
    mc = _tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    eng = LLMEngine(EngineConfig(dtype="float32", **cfg), mc)
    assert eng.runner.packed_linears == 4 * 2 + 1  # qkv, o, gate_up, down per layer + lm_head
    eng = LLMEngine(EngineConfig(dtype="bfloat16", **cfg), mc)
    assert eng.runner.packed_linears == 0


@needs_packed
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_engine_packs_every_linear_and_stays_close(dtype):
    """--quantization int8: every linear layer int8, any dtype; the first step's logits stay
    near the unquantized engine's (per-channel int8 keeps about 0.4 % of each weight row)."""
    cfg = dict(load_format="dummy", num_kv_blocks=16, progress=False, dtype=dtype)
    mc = _tiny_llama(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    logits = {}
    for quant in (None, "int8"):
        eng = LLMEngine(EngineConfig(quantization=quant, **cfg), mc)
        if quant == "int8":
            assert eng.runner.packed_linears == 4 * 2 + 1
            assert all(
                m.packed.dtype == torch.int8
                for m in eng.runner.model.modules()
                if isinstance(m, cpu_ops.PackedLinear)
            )
        eng.add_request("r", list(range(1, 20)), SamplingParams(max_tokens=1))
        sched = eng.scheduler.schedule()
        logits[quant] = eng.runner.execute(sched).sample_logits
    ref, got = logits[None], logits["int8"]
    rel = (got - ref).norm() / ref.norm()
    assert 0 < rel < 0.05, rel


class _CountingStack:
    """The runner's DecodeStack, counting the steps it ran."""

    def __init__(self, stack) -> None:
        self.stack, self.runs = stack, 0

    def run(self, *args):
        self.runs += 1
        return self.stack.run(*args)


@needs_packed
@pytest.mark.parametrize("kv_dtype", ["auto", "bfloat16", "int8"])
@pytest.mark.parametrize("quant", [None, "int8"])
@pytest.mark.parametrize("attention_bias", [False, True])  # Llama: qkv and o biases
def test_decode_stack_is_bit_identical_to_the_python_forward(quant, attention_bias, kv_dtype):
    """Decode-only steps run the C++ DecodeStack: same kernels in the same order as
    LlamaModel.forward over FusedCpuOps, so every step's logits are equal bit for bit to an
    engine that runs the Python forward every step (prompts of different lengths, GQA, block
    boundaries crossed, batches that shrink as requests finish)."""
    mc = _tiny_llama(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=3,
        attention_bias=attention_bias,
    )
    cfg = dict(load_format="dummy", num_kv_blocks=64, block_size=8, progress=False)
    cfg["kv_cache_dtype"] = kv_dtype
    logits: list[list[torch.Tensor]] = [[], []]
    stacks = []
    for i in range(2):
        eng = LLMEngine(EngineConfig(dtype="float32", quantization=quant, **cfg), mc)
        assert eng.runner.decode_stack is not None
        if i == 0:
            eng.runner.decode_stack = _CountingStack(eng.runner.decode_stack)
            stacks.append(eng.runner.decode_stack)
        else:
            eng.runner.decode_stack = None  # the Python forward every step
        execute = eng.runner.execute

        def record(sched, execute=execute, out=logits[i]):
            result = execute(sched)
            out.append(result.sample_logits)
            return result

        eng.runner.execute = record
        for j, (plen, outlen) in enumerate(((5, 20), (17, 9), (30, 14))):
            prompt = [(7 * j + 3 * t) % 96 for t in range(plen)]
            eng.add_request(f"r{j}", prompt, SamplingParams(max_tokens=outlen, ignore_eos=True))
        while eng.has_unfinished_requests():
            eng.step()
    assert len(logits[0]) == len(logits[1]) >= 20
    for step, (a, b) in enumerate(zip(*logits)):
        assert torch.equal(a, b), f"step {step}"
    assert stacks[0].runs >= 15  # decode-only steps went through the stack


@needs_packed
def test_decode_stack_is_used_only_for_float32_fused_ops():
    mc = _tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    cfg = dict(load_format="dummy", num_kv_blocks=16, progress=False)
    assert LLMEngine(EngineConfig(dtype="float32", **cfg), mc).runner.decode_stack is not None
    # bf16 runs plain torch ops (and int8 weights with bf16 activations): the Python forward
    for quant in (None, "int8"):
        eng = LLMEngine(EngineConfig(dtype="bfloat16", quantization=quant, **cfg), mc)
        assert eng.runner.decode_stack is None


@needs_packed
def test_decode_stack_refuses_bad_input():
    mc = _tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    eng = LLMEngine(
        EngineConfig(dtype="float32", load_format="dummy", num_kv_blocks=4, progress=False), mc
    )
    stack, kv = eng.runner.decode_stack, eng.runner.kv_caches
    x, cs = torch.randn(1, 32), torch.randn(1, 8)
    tables, lens = torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64)
    slot = torch.zeros(1, dtype=torch.int64)
    assert stack.run(x.clone(), kv, None, cs, cs, slot, tables, lens).shape == (1, 32)
    with pytest.raises(RuntimeError, match="out of range"):
        stack.run(x.clone(), kv, None, cs, cs, slot + 4 * 16, tables, lens)
    with pytest.raises(RuntimeError, match="cache dtype"):
        stack.run(x.clone(), kv.double(), None, cs, cs, slot, tables, lens)
    with pytest.raises(RuntimeError, match="kv_caches"):
        stack.run(x.clone(), kv[:1], None, cs, cs, slot, tables, lens)
    with pytest.raises(RuntimeError, match="float32"):
        stack.run(x.double(), kv, None, cs, cs, slot, tables, lens)
    with pytest.raises(RuntimeError, match="slot_mapping"):
        stack.run(x.clone(), kv, None, cs, cs, torch.zeros(2, dtype=torch.int64), tables, lens)


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16", "int8"])
def test_engine_with_a_narrower_kv_cache(kv_dtype):
    """The same memory holds 2x (bf16/fp16) or 3.2x (int8 + its scales, head size 16) the
    float32 tokens; decoding over the narrower cache stays close to the float32 cache's logits
    at every step (prefill over the cache, then decodes that read it)."""
    mc = _tiny_llama(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2)
    cfg = dict(load_format="dummy", kv_cache_memory=2**20, progress=False, dtype="float32")
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
    bytes_per_head = {"bfloat16": 2 * 16, "float16": 2 * 16, "int8": 16 + 4}  # head size 16
    logits = []
    for kv in ("auto", kv_dtype):
        eng = LLMEngine(EngineConfig(kv_cache_dtype=kv, **cfg), mc)
        execute, steps = eng.runner.execute, []

        def record(sched, execute=execute, steps=steps):
            out = execute(sched)
            steps.append(out.sample_logits)
            return out

        eng.runner.execute = record
        eng.add_request("a", list(range(1, 40)), SamplingParams(max_tokens=12, ignore_eos=True))
        eng.add_request("b", list(range(50, 60)), SamplingParams(max_tokens=12, ignore_eos=True))
        while eng.has_unfinished_requests():
            eng.step()
        logits.append(steps)
        if kv == "auto":
            base_blocks = eng.block_manager.num_blocks
    assert eng.runner.kv_caches.dtype == dtypes[kv_dtype]
    assert (eng.runner.kv_scales is not None) == (kv_dtype == "int8")
    ratio = eng.block_manager.num_blocks / base_blocks
    assert abs(ratio - 4 * 16 / bytes_per_head[kv_dtype]) < 0.05, ratio
    assert len(logits[0]) == len(logits[1]) == 12
    for ref, got in zip(*logits):
        rel = (got - ref).norm() / ref.norm()
        assert rel < 0.05, rel


def test_kv_cache_dtype_is_checked():
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype must be"):
        EngineConfig(kv_cache_dtype="int4")
    with pytest.raises(InvalidRequestError, match="fp8 is not supported yet"):
        EngineConfig(kv_cache_dtype="fp8")
    assert EngineConfig(kv_cache_dtype="bf16").kv_cache_dtype == "bfloat16"


def test_int8_quantization_is_refused_for_unknown_names():
    with pytest.raises(InvalidRequestError, match="quantization must be none or int8"):
        EngineConfig(quantization="int4")
    assert EngineConfig(quantization="none").quantization is None


# -- fused element-wise ops ----------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 7, 100])
@pytest.mark.parametrize("hidden", [576, 100])
def test_rms_norm_and_add_rms_norm_match_reference(rows, hidden):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen) * 3
    res = torch.randn(rows, hidden, generator=gen)
    w = torch.randn(hidden, generator=gen)
    tol = dict(rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), **tol)
    want_normed, want_res = reference.fused_add_rms_norm(x, res, w, 1e-6)
    got = cpu_ops.add_rms_norm_(x, res, w, 1e-6)
    torch.testing.assert_close(res, want_res, **tol)  # updated in place
    torch.testing.assert_close(got, want_normed, **tol)


@pytest.mark.parametrize("head_size", [64, 128, 10])
def test_rotary_in_place_matches_reference(head_size):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    rows, heads, kv_heads = 37, 6, 2
    q = torch.randn(rows, heads, head_size, generator=gen)
    k = torch.randn(rows, kv_heads, head_size, generator=gen)
    v = torch.randn(rows, kv_heads, head_size, generator=gen)
    pos = torch.randint(0, 500, (rows,), generator=gen)
    inv = 1.0 / (10000 ** (torch.arange(0, head_size, 2).float() / head_size))
    ang = torch.arange(512).float()[:, None] * inv[None]
    cache = torch.cat((ang.cos(), ang.sin()), dim=-1)  # [max_pos, head_size]: cos half | sin half
    want_q, want_k = reference.rotary_embedding(pos, q, k, cache)
    half = head_size // 2
    cos = torch.cat((cache[pos, :half], cache[pos, :half]), dim=-1)
    sin = torch.cat((cache[pos, half:], cache[pos, half:]), dim=-1)
    qkv = torch.cat((q.flatten(1), k.flatten(1), v.flatten(1)), dim=1)
    cpu_ops.rotary_(qkv, cos, sin, heads + kv_heads, head_size)
    tol = dict(rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
    torch.testing.assert_close(qkv[:, : heads * head_size].view_as(q), want_q, **tol)
    got_k = qkv[:, heads * head_size : (heads + kv_heads) * head_size].view_as(k)
    torch.testing.assert_close(got_k, want_k, **tol)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_size :].view_as(v), v)  # v untouched


def test_silu_mul_matches_torch():
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    gu = torch.randn(19, 2 * 1536, generator=gen) * 8
    gu[0, :8] = torch.tensor([100.0, -100.0, 1000.0, -1000.0, 88.5, -88.5, 0.0, -0.0])  # exp limits
    want = torch.nn.functional.silu(gu[:, :1536]) * gu[:, 1536:]
    torch.testing.assert_close(cpu_ops.silu_mul(gu), want, rtol=1e-5, atol=1e-5)


def test_fused_ops_refuse_bad_input():
    with pytest.raises(RuntimeError, match="float32"):
        cpu_ops.rms_norm(torch.randn(2, 8).double(), torch.randn(8), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        cpu_ops.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="residual"):
        cpu_ops.add_rms_norm_(torch.randn(2, 8), torch.randn(3, 8), torch.randn(8), 1e-5)
    with pytest.raises(RuntimeError, match="heads"):
        cpu_ops.rotary_(torch.randn(2, 8), torch.randn(2, 4), torch.randn(2, 4), 3, 4)
    with pytest.raises(RuntimeError, match="silu_mul"):
        cpu_ops.silu_mul(torch.randn(2, 7))


def test_fused_model_forward_matches_plain():
    """The whole model: fused element-wise ops vs the plain torch ones (packed linears in both),
    head size 64 with 3 query heads per KV head (the fast decode path): two prefills, then two
    decodes over the cached KV mixed with a third prefill in one batch."""
    from engine_svc.models.loader import dummy_model
    from engine_svc.runner.attention import build_metadata
    from engine_svc.runner.cpu import ModelRunner
    from engine_svc.runner.cpu_model_ops import FusedCpuOps, TorchCpuOps

    mc = ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 128,
            "hidden_size": 384,
            "intermediate_size": 200,
            "num_hidden_layers": 3,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "max_position_embeddings": 256,
        }
    )
    steps = [  # (query lens, seq lens, block tables, token ids): decodes first, as the runner does
        ([21, 5], [21, 5], [[0, 1], [2]], list(range(3, 24)) + [40, 41, 42, 43, 44]),
        ([1, 1, 9], [6, 22, 9], [[2], [0, 1], [3]], [7, 9] + list(range(60, 69))),
    ]
    outs = []
    for fused in (False, True):
        model = dummy_model(mc, torch.float32, seed=5)
        for p in model.parameters():  # wider weights: 0.02 would make every hidden state alike
            p.data.mul_(10 if p.dim() > 1 else 1)
        runner = ModelRunner(model, mc, torch.float32, 16, 16, 256)
        if not fused:
            runner.ops = TorchCpuOps(mc, torch.float32, 256)
        assert isinstance(runner.ops, FusedCpuOps) is fused
        hidden = []
        for q_lens, seq_lens, tables, tok in steps:
            pos = torch.cat([torch.arange(s - q, s) for q, s in zip(q_lens, seq_lens)])
            meta = build_metadata(q_lens, seq_lens, tables, 16, runner.fused_decode)
            step = runner.ops.step(pos, meta)
            with torch.inference_mode():
                hidden.append(model(torch.tensor(tok), runner.layer_kv, runner.ops, step))
        outs.append(hidden)
    for plain, fused in zip(*outs):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


def test_ops_release_the_gil():
    """A long kernel call must not stall the engine's IO thread (heartbeats, health probes):
    Python code in another thread keeps running while it computes."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 576, generator=gen)
    w = torch.randn(8192, 576, generator=gen)
    packed = cpu_ops.pack_weight(w) if cpu_ops.packed_linear_supported() else None
    q, kc, vc, bt, sl = _case(9, 3, 64, 16, torch.float32, [2000] * 48, 6200, False, gen)
    calls = [lambda: cpu_ops.paged_decode(q, kc, vc, bt, sl, 0.125)]
    if packed is not None:
        calls.append(lambda: cpu_ops.packed_linear(x, packed, 8192))
    for call in calls:
        span: list[float] = []

        def worker(call=call, span=span):
            span.append(time.monotonic())
            for _ in range(10):
                call()
            span.append(time.monotonic())

        ticks = []
        t = threading.Thread(target=worker)
        t.start()
        while t.is_alive():
            ticks.append(time.monotonic())
            time.sleep(0.001)
        t.join()
        start, end = span
        inside = [x for x in ticks if start < x < end]
        # Holding the GIL, the loop above could not run at all while the kernel does.
        assert len(inside) >= 10, (end - start, len(inside))


def test_without_the_kernels_the_torch_path_gives_the_same_tokens(tmp_path):
    """PAGEDSERVE_CPU_KERNEL=0 (as when no compiler is there): the engine runs on the plain
    torch path and produces the same greedy tokens."""
    import json
    import subprocess
    import sys

    from tests.tiny_models import make_tiny_model

    path = make_tiny_model(tmp_path / "m", num_heads=6, num_kv_heads=2, head_dim=64)
    script = f"""
import json
from engine_svc import LLM, SamplingParams
from engine_svc.runner.cpu_model_ops import FusedCpuOps
llm = LLM({str(path)!r}, dtype="float32", num_kv_blocks=32, progress=False)
r = llm.engine.runner
out = llm.generate([[5, 6, 7, 8], list(range(10, 40))],
                   SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
print(json.dumps([r.fused_decode, r.packed_linears, isinstance(r.ops, FusedCpuOps),
                  [o.outputs[0].token_ids for o in out]]))
"""
    runs = []
    for flag in ("1", "0"):
        env = {**os.environ, "PAGEDSERVE_CPU_KERNEL": flag}
        proc = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    with_kernels, without = runs
    packed = 4 * 2 + 1 if cpu_ops.packed_linear_supported() else 0  # per layer 4, + lm_head
    assert with_kernels[:3] == [True, packed, True]
    assert without[:3] == [False, 0, False]
    assert with_kernels[3] == without[3]


def test_build_lock_clears_a_dead_builds_lock_and_excludes_other_processes(tmp_path):
    """A build killed by SIGKILL leaves torch's lock file, on which every later build waited
    forever. Under the flock it can only be such a leftover: removed. The flock itself keeps a
    second process (a data-parallel replica) out while held, and dies with its holder."""
    import subprocess
    import sys

    from engine_svc.runner.cpu_ops import build_lock

    (tmp_path / "lock").write_text("")
    probe = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
    )
    flock = str(tmp_path / "pagedserve.flock")
    with build_lock(str(tmp_path)):
        assert not (tmp_path / "lock").exists()
        other = subprocess.run([sys.executable, "-c", probe, flock], capture_output=True)
        assert other.returncode != 0 and b"BlockingIOError" in other.stderr
    free = subprocess.run([sys.executable, "-c", probe, flock], capture_output=True)
    assert free.returncode == 0, free.stderr
