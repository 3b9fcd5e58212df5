"""Every Triton kernel against its plain-torch reference.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (set in conftest), so
shapes stay small; on a CUDA machine the same tests run the compiled kernels. Inputs are
random on every run (the seed is in the failure message), outputs are poisoned with NaN first,
and so are the cache blocks and slots a kernel must not read.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from engine_svc.models.config import ModelConfig, rope_cos_sin_cache  # noqa: E402
from kernels import reference, triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol): the kernel rounds softmax probabilities to the activation dtype for the PV dot.
ATTN_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
HEADS = [(2, 2), (4, 1), (6, 2)]  # GQA ratios 1, 4 and 3 (not a power of two)


@pytest.fixture
def gen() -> torch.Generator:
    seed = random.randrange(2**31)
    print(f"seed={seed}")  # shown by pytest when the test fails
    return torch.Generator().manual_seed(seed)


def _make_batch(query_lens, seq_lens, block_size, num_blocks, gen, high_ids=False):
    """Distinct random blocks per sequence; table rows padded with random (poisoned) blocks."""
    need = sum(-(-s // block_size) for s in seq_lens)
    pool = torch.randperm(num_blocks, generator=gen)
    if high_ids:
        pool = torch.arange(num_blocks - 1, num_blocks - 1 - need, -1)
    tables, i = [], 0
    for s in seq_lens:
        n = -(-s // block_size)
        tables.append(pool[i : i + n].tolist())
        i += n
    width = max(len(t) for t in tables) + 1  # one spare column: never read
    pad = torch.randint(0, num_blocks, (len(tables), width), generator=gen).tolist()
    rows = [t + pad[r][len(t) :] for r, t in enumerate(tables)]
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    as_i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return tables, as_i32(rows), as_i32(seq_lens), as_i32(qsl)


def _poisoned_cache(tables, seq_lens, num_blocks, block_size, kv_heads, head_size, dtype, gen):
    """NaN everywhere except the slots holding a token of some sequence's context."""
    k = torch.full((num_blocks, block_size, kv_heads, head_size), float("nan"), dtype=dtype)
    v = k.clone()
    for table, s in zip(tables, seq_lens):
        for pos in range(s):
            b, o = table[pos // block_size], pos % block_size
            k[b, o] = torch.randn(kv_heads, head_size, generator=gen).to(dtype)
            v[b, o] = torch.randn(kv_heads, head_size, generator=gen).to(dtype)
    return k, v


def _check_attention(
    query_lens,
    seq_lens,
    heads,
    head_size,
    block_size,
    dtype,
    gen,
    num_splits=1,
    num_blocks=64,
    high_ids=False,
    **launch,
):
    num_heads, kv_heads = heads
    tables, bt, sl, qsl = _make_batch(query_lens, seq_lens, block_size, num_blocks, gen, high_ids)
    kc, vc = _poisoned_cache(
        tables, seq_lens, num_blocks, block_size, kv_heads, head_size, dtype, gen
    )
    q = torch.randn(sum(query_lens), num_heads, head_size, generator=gen).to(dtype)
    scale = head_size**-0.5
    want = reference.paged_attention(q, kc, vc, bt, sl, qsl, scale)
    dev = [t.to(DEVICE) for t in (q, kc, vc, bt, sl, qsl)]
    out = torch.full_like(dev[0], float("nan"))
    got = triton_ops.paged_attention(*dev, scale, out=out, num_splits=num_splits, **launch)
    assert got is out
    assert not got.isnan().any()
    rtol, atol = ATTN_TOL[dtype]
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_attention_decode(dtype, heads, head_size, block_size, gen):
    seq_lens = [1, 15, 16, 33, 70]  # one token, block edges, several blocks
    _check_attention([1] * len(seq_lens), seq_lens, heads, head_size, block_size, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_attention_mixed(dtype, heads, head_size, block_size, gen):
    # decodes, a fresh prompt, a chunk after a cached prefix (causal mask against the prefix),
    # a 2-token tail chunk; chunk lengths straddle the kernel's query tiles
    query_lens = [1, 1, 21, 13, 2]
    seq_lens = [9, 40, 21, 50, 35]
    _check_attention(query_lens, seq_lens, heads, head_size, block_size, dtype, gen)


@pytest.mark.parametrize("num_splits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_split_kv(num_splits, dtype, gen):
    # long and short contexts: short ones leave some splits empty
    seq_lens = [3, 100, 190]
    _check_attention([1, 1, 1], seq_lens, (4, 1), 64, 16, dtype, gen, num_splits, num_blocks=32)


def test_paged_attention_split_kv_mixed_batch(gen):
    _check_attention([1, 17, 5], [60, 17, 45], (6, 2), 64, 16, torch.float32, gen, 4)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("tile_n", [16, 32, 128])
def test_paged_attention_tile_overrides(tile_n, num_splits, gen):
    # the default tile is 64 keys (32 when split); every other tile computes the same
    _check_attention([1, 19, 1], [150, 19, 33], (4, 1), 64, 16, torch.bfloat16, gen, num_splits,
                     tile_n=tile_n, num_warps=8, num_stages=2)  # fmt: skip


def test_paged_attention_large_block_ids(gen):
    _check_attention(
        [1, 1, 9], [30, 70, 20], (4, 2), 64, 16, torch.float32, gen, num_blocks=2048, high_ids=True
    )


def test_paged_attention_index_overflow(gen):
    """A cache past 2**31 elements: block id * block stride overflows int32. The cache is
    allocated uninitialised (pages never touched stay virtual), only the used slots written."""
    block_size, kv_heads, head_size = 16, 1, 64
    num_blocks = 2**31 // (block_size * kv_heads * head_size) + 64
    try:
        kc = torch.empty(num_blocks, block_size, kv_heads, head_size, dtype=torch.float16)
        vc = torch.empty_like(kc)
    except RuntimeError:
        pytest.skip("cannot reserve 2 x 4 GiB of address space")
    if DEVICE == "cuda":
        kc, vc = kc.cuda(), vc.cuda()
    tables = [[num_blocks - 1, num_blocks - 2], [5, num_blocks - 3]]
    seq_lens = [20, 18]
    for table in tables:
        for blk in table:
            kc[blk] = torch.randn(block_size, kv_heads, head_size, generator=gen).to(kc)
            vc[blk] = torch.randn(block_size, kv_heads, head_size, generator=gen).to(vc)
    bt = torch.tensor(tables, dtype=torch.int32, device=kc.device)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=kc.device)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32, device=kc.device)
    q = torch.randn(2, 4, head_size, generator=gen).to(kc)
    # The reference only gathers the tables' blocks, so it reads the same few pages.
    want = reference.paged_attention(
        q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), sl.cpu(), qsl.cpu(), 0.125
    )
    got = triton_ops.paged_attention(q, kc, vc, bt, sl, qsl, 0.125)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=4e-3, atol=4e-3)

    # reshape_and_cache into the same high blocks
    key = torch.randn(2, kv_heads, head_size, generator=gen).to(kc)
    slots = torch.tensor([(num_blocks - 1) * block_size + 3, -1], device=kc.device)
    triton_ops.reshape_and_cache(key, key, kc, vc, slots)
    assert torch.equal(kc[num_blocks - 1, 3].cpu(), key[0].cpu())


def test_paged_attention_rejects_bad_layouts():
    q = torch.zeros(2, 4, 64)
    kc = torch.zeros(8, 16, 2, 64)
    bt = torch.zeros(2, 1, dtype=torch.int32)
    i32 = torch.tensor([1, 1], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        triton_ops.paged_attention(q, kc, kc, bt.long(), i32, qsl, 1.0)
    with pytest.raises(ValueError, match="share one dtype"):
        triton_ops.paged_attention(q.half(), kc, kc, bt, i32, qsl, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        triton_ops.paged_attention(q, kc, kc, bt, i32, qsl, 1.0, num_splits=3)
    with pytest.raises(ValueError, match="tile_n"):
        triton_ops.paged_attention(q, kc, kc, bt, i32, qsl, 1.0, tile_n=24)
    with pytest.raises(ValueError, match="KV heads"):
        triton_ops.paged_attention(torch.zeros(2, 3, 64), kc, kc, bt, i32, qsl, 1.0)


# -- reshape_and_cache --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,head_size", [(1, 64), (2, 128), (3, 64)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_reshape_and_cache(dtype, kv_heads, head_size, block_size, gen):
    num_blocks, n = 16, 23
    shape = (num_blocks, block_size, kv_heads, head_size)
    kc = torch.randn(shape, generator=gen).to(dtype)
    vc = torch.randn(shape, generator=gen).to(dtype)
    # key/value as strided views of a fused qkv output, as the model passes them
    qkv = torch.randn(n, 3, kv_heads, head_size, generator=gen).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[[0, 7, 22]] = -1  # padded rows: must leave the cache untouched
    want_k, want_v = kc.clone(), vc.clone()
    reference.reshape_and_cache(key, value, want_k, want_v, slots)
    got_k, got_v = kc.clone().to(DEVICE), vc.clone().to(DEVICE)
    triton_ops.reshape_and_cache(key.to(DEVICE), value.to(DEVICE), got_k, got_v, slots.to(DEVICE))
    assert torch.equal(got_k.cpu(), want_k)
    assert torch.equal(got_v.cpu(), want_v)
    assert not torch.equal(want_k, kc)  # the non-padded rows were written


# -- norms and rotary ----------------------------------------------------------------------------

NORM_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 4096])
def test_fused_add_rms_norm(dtype, hidden, gen):
    x = torch.randn(7, hidden, generator=gen).to(dtype)
    res = (torch.randn(7, hidden, generator=gen) * 3).to(dtype)
    w = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    want, want_res = reference.fused_add_rms_norm(x, res, w, 1e-5)
    got, got_res = triton_ops.fused_add_rms_norm(x.to(DEVICE), res.to(DEVICE), w.to(DEVICE), 1e-5)
    assert torch.equal(got_res.cpu(), want_res)  # one rounding of the same sum
    rtol, atol = NORM_TOL[dtype]
    torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(
        triton_ops.rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-6).cpu(),
        reference.rms_norm(x, w, 1e-6),
        rtol=rtol,
        atol=atol,
    )


def _llama_cfg(head_size: int, rope_scaling: dict | None) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 32,
            "hidden_size": 4 * head_size,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_theta": 500000.0, **(rope_scaling or {})},
        }
    )


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["default", "llama3"])
def test_rotary_embedding(dtype, head_size, scaling, gen):
    cache = rope_cos_sin_cache(_llama_cfg(head_size, scaling), 4096)
    n, heads, kv_heads = 9, 6, 2
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_size, generator=gen).to(dtype)
    q = qkv[:, : heads * head_size].view(n, heads, head_size)  # strided views, as in the model
    k = qkv[:, heads * head_size : (heads + kv_heads) * head_size].view(n, kv_heads, head_size)
    pos = torch.randint(0, 4096, (n,), generator=gen)
    pos[0] = 0
    got_q, got_k = triton_ops.rotary_embedding(
        pos.to(DEVICE), q.to(DEVICE), k.to(DEVICE), cache.to(DEVICE)
    )
    # The kernel rounds once from float32 arithmetic: within half an ulp of the exact result
    # (computed in float64 from the same float32 cos/sin), plus float32 error.
    exact = reference.rotary_embedding(pos, q.double(), k.double(), cache.double())
    half_ulp = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    for got, want in zip((got_q, got_k), exact):
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu().double(), want, rtol=half_ulp, atol=1e-6)
    # and close to the reference, which rounds cos/sin, each product and the sum as HF does:
    # each of those roundings is at most half an ulp of |x1| + |x2| <= 2 max|x|, or of the sum.
    want_q, want_k = reference.rotary_embedding(pos, q, k, cache)
    bound = dict(rtol=2 * half_ulp + 1e-6, atol=8 * half_ulp * qkv.abs().max().item() + 1e-6)
    torch.testing.assert_close(got_q.cpu(), want_q, **bound)
    torch.testing.assert_close(got_k.cpu(), want_k, **bound)


def test_rotary_partial_rotary_dim(gen):
    cache = rope_cos_sin_cache(_llama_cfg(32, None), 128)  # rotary dim 32 of head size 64
    q = torch.randn(5, 2, 64, generator=gen)
    k = torch.randn(5, 1, 64, generator=gen)
    pos = torch.arange(5)
    want = reference.rotary_embedding(pos, q, k, cache)
    got = triton_ops.rotary_embedding(pos.to(DEVICE), q.to(DEVICE), k.to(DEVICE), cache.to(DEVICE))
    for w, g in zip(want, got):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kv_heads,head_size,rotary_dim", [(2, 128, 128), (3, 64, 64), (1, 64, 32), (3, 96, 64)]
)
@pytest.mark.parametrize("block_size", [16, 32])
def test_rotary_and_cache(dtype, kv_heads, head_size, rotary_dim, block_size, gen):
    """The fused launch equals rotary_embedding then reshape_and_cache, both Triton: the
    rotated query and every cache slot bit for bit (the rotation is the same float32 code)."""
    n, heads, num_blocks = 11, 2 * kv_heads, 16
    cfg = _llama_cfg(rotary_dim, None)
    cache = rope_cos_sin_cache(cfg, 4096)  # rotary dim = cfg head size
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_size, generator=gen).to(dtype)
    q = qkv[:, : heads * head_size].view(n, heads, head_size)  # strided views, as in the model
    k = qkv[:, heads * head_size : (heads + kv_heads) * head_size].view(n, kv_heads, head_size)
    v = qkv[:, (heads + kv_heads) * head_size :].view(n, kv_heads, head_size)
    pos = torch.randint(0, 4096, (n,), generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[[0, 5]] = -1  # padded rows: the cache is not touched, the query still rotated
    shape = (num_blocks, block_size, kv_heads, head_size)
    kc = torch.full(shape, float("nan"), dtype=dtype)  # poisoned: only written slots change
    vc = kc.clone()
    dev = lambda *ts: [t.clone().to(DEVICE) for t in ts]  # noqa: E731 (copies, also on a CPU)
    want_q, want_k = triton_ops.rotary_embedding(*dev(pos, q, k, cache))
    want_kc, want_vc = dev(kc, vc)
    triton_ops.reshape_and_cache(want_k, v.to(DEVICE), want_kc, want_vc, slots.to(DEVICE))
    got_kc, got_vc = dev(kc, vc)
    got_q = triton_ops.rotary_and_cache(*dev(pos, q, k, v, cache), got_kc, got_vc, *dev(slots))
    assert torch.equal(got_q, want_q)
    # both caches bit for bit, poison (in the slots not written) included
    assert _same(got_kc.cpu(), want_kc.cpu()) and _same(got_vc.cpu(), want_vc.cpu())
    written = int((slots >= 0).sum())
    poisoned = (num_blocks * block_size - written) * kv_heads * head_size
    assert int(got_kc.isnan().sum()) == poisoned and int(got_vc.isnan().sum()) == poisoned
    assert torch.isnan(kc).all() and torch.isnan(vc).all()  # the inputs were not written
    # and the whole thing agrees with the plain-torch reference
    ref_kc, ref_vc = kc.clone(), vc.clone()
    ref_q = reference.rotary_and_cache(pos, q, k, v, cache, ref_kc, ref_vc, slots)
    half_ulp = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    bound = dict(rtol=2 * half_ulp + 1e-6, atol=8 * half_ulp * qkv.abs().max().item() + 1e-6,
                 equal_nan=True)  # fmt: skip
    torch.testing.assert_close(got_q.cpu(), ref_q, **bound)
    torch.testing.assert_close(got_kc.cpu(), ref_kc, **bound)
    assert _same(got_vc.cpu(), ref_vc)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where the other is NaN."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def test_rotary_and_cache_rejects_bad_layouts():
    q, k = torch.zeros(3, 4, 64), torch.zeros(3, 2, 64)
    cache = torch.zeros(8, 64)
    kc = torch.zeros(4, 16, 2, 64)
    slots = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        triton_ops.rotary_and_cache(torch.arange(3), q, k, k, cache, kc, kc, slots.int())
    with pytest.raises(ValueError, match="do not fit"):
        triton_ops.rotary_and_cache(torch.arange(3), q, k, k, cache, kc[:, :, :1], kc, slots)
    with pytest.raises(ValueError, match="rotary dim"):
        triton_ops.rotary_and_cache(torch.arange(3), q, k, k, torch.zeros(8, 65), kc, kc, slots)


# -- activation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 96, 2500])  # 2500: several programs, a ragged last one
def test_silu_and_mul(dtype, inter, gen):
    x = (torch.randn(7, 2 * inter, generator=gen) * 4).to(dtype)
    want = reference.silu_and_mul(x)
    out = triton_ops.silu_and_mul(x.to(DEVICE))
    assert out.shape == (7, inter) and out.dtype == dtype
    # silu rounds to the dtype as torch's does, but its exp and division are not torch's
    # (compiled: ex2.approx and div.full), so the float32 silu may differ by a few ulps: in
    # bf16/fp16 that rarely moves its rounding, by one ulp, and the product by one more.
    ulp = {torch.float32: 2**-22, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(out.cpu(), want, rtol=2 * ulp, atol=1e-6)
    if dtype != torch.float32:  # nearly all elements bit for bit
        assert (out.cpu() != want).float().mean() < 0.02


def test_silu_and_mul_rejects_bad_layouts():
    with pytest.raises(ValueError, match="2 \\* inter"):
        triton_ops.silu_and_mul(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="contiguous rows"):
        triton_ops.silu_and_mul(torch.zeros(8, 3).t())
    assert triton_ops.silu_and_mul(torch.zeros(0, 8)).shape == (0, 4)


# -- norm fused into the projection -----------------------------------------------------------


# 1 row (decode at batch 1), a ragged 5, and the most one launch takes; hidden 200 with a
# 64-wide K tile: four tiles, the last ragged; 40 output columns: three programs, one ragged.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize(
    "residual,bias,gated",
    [(False, False, False), (True, False, False), (True, True, False), (True, False, True),
     (False, True, True)],
    ids=["first-layer", "residual", "bias", "gated", "first-gated-bias"],
)  # fmt: skip
def test_rms_norm_linear(dtype, rows, residual, bias, gated, gen):
    hidden, n = 200, 40
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    res = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype) if residual else None
    nw = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    w = (torch.randn(2 * n if gated else n, hidden, generator=gen) / hidden**0.5).to(dtype)
    b = torch.randn(w.shape[0], generator=gen).to(dtype) if bias else None
    want, want_res = reference.rms_norm_linear(x, res, nw, 1e-5, w, b, gated)
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = torch.full(want.shape, float("nan"), dtype=dtype, device=DEVICE)
    got, got_res = triton_ops.rms_norm_linear(
        on(x), on(res), on(nw), 1e-5, on(w), on(b), gated, out, block_k=64
    )
    assert got is out and got.shape == (rows, n)
    if residual:
        assert torch.equal(got_res.cpu(), want_res)  # one rounding of the same sum
    else:
        assert torch.equal(got_res.cpu(), x)  # x itself is the residual
    # Same roundings as the reference, but the matmul's float32 sum runs in another order:
    # a bf16/fp16 result may land one ulp away (and a gated one a few, through silu).
    ulp = {torch.float32: 2**-17, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(got.cpu(), want, rtol=4 * ulp, atol=4 * ulp)
    # Nearly all elements bit for bit. fp16 keeps 3 more mantissa bits than bf16, so a float32
    # sum in another order lands on a neighbouring fp16 value more often: over 40 random seeds
    # up to 6 of one row's 40 outputs (15 %) and 5.5 % of 5 rows differed (0.05 had failed
    # about one run in six).
    if dtype != torch.float32:
        share = {torch.bfloat16: 0.05, torch.float16: 0.2}[dtype]
        assert (got.cpu() != want).float().mean() < share


def test_rms_norm_linear_default_tiles_and_one_k_tile(gen):
    """Default launch (one K tile covers hidden 96; 16 columns a program) on a model-like
    shape: the decode step's qkv projection of a tiny Llama."""
    x = torch.randn(3, 96, generator=gen)
    res = torch.randn(3, 96, generator=gen)
    nw, w = torch.rand(96, generator=gen) + 0.5, torch.randn(160, 96, generator=gen) / 10
    want, want_res = reference.rms_norm_linear(x, res, nw, 1e-6, w)
    got, got_res = triton_ops.rms_norm_linear(x.to(DEVICE), res.to(DEVICE), nw.to(DEVICE), 1e-6,
                                              w.to(DEVICE))  # fmt: skip
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_res.cpu(), want_res)


def test_rms_norm_linear_rejects_bad_layouts():
    x, nw, w = torch.zeros(2, 32), torch.ones(32), torch.zeros(8, 32)
    with pytest.raises(ValueError, match="at most 64 rows"):
        triton_ops.rms_norm_linear(torch.zeros(65, 32), None, nw, 1e-5, w)
    with pytest.raises(ValueError, match="share one dtype"):
        triton_ops.rms_norm_linear(x, None, nw, 1e-5, w.half())
    with pytest.raises(ValueError, match="even row count"):
        triton_ops.rms_norm_linear(x, None, nw, 1e-5, torch.zeros(7, 32), gated_silu=True)
    with pytest.raises(ValueError, match="weight must be"):
        triton_ops.rms_norm_linear(x, None, nw, 1e-5, torch.zeros(32, 8).t())
    with pytest.raises(ValueError, match="block_n"):
        triton_ops.rms_norm_linear(x, None, nw, 1e-5, w, block_n=24)
    with pytest.raises(ValueError, match="out must be"):
        triton_ops.rms_norm_linear(x, None, nw, 1e-5, w, out=torch.zeros(2, 4))
    empty, res = triton_ops.rms_norm_linear(torch.zeros(0, 32), None, nw, 1e-5, w)
    assert empty.shape == (0, 8) and res.shape == (0, 32)
    ones = torch.ones(2, 32)
    none, res = triton_ops.rms_norm_linear(ones, ones, nw, 1e-5, torch.zeros(0, 32))
    assert none.shape == (2, 0) and torch.equal(res, 2 * ones)  # the residual add still holds
