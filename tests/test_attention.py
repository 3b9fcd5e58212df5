"""CPU paged attention (engine_svc.runner.attention) against the plain-torch kernel references."""

from __future__ import annotations

import pytest
import torch

from engine_svc.runner import cpu_ops
from engine_svc.runner.attention import LayerKV, attend, build_metadata, write_kv
from kernels.reference import (
    paged_attention,
    quantize_kv_int8,
    reshape_and_cache,
    rms_norm,
    rotary_embedding,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _random_batch(query_lens, seq_lens, num_blocks, block_size, gen, large_ids=False):
    """Random block tables with distinct blocks per sequence (optionally high block ids)."""
    need = sum((s + block_size - 1) // block_size for s in seq_lens)
    pool = torch.randperm(num_blocks, generator=gen)
    if large_ids:
        pool = pool.flip(0)  # take the highest ids first
    tables, i = [], 0
    for s in seq_lens:
        n = (s + block_size - 1) // block_size
        tables.append(pool[i : i + n].tolist())
        i += n
    assert i == need <= num_blocks
    return tables


def _narrow(cache: torch.Tensor, kv_dtype: torch.dtype | None):
    """(cache as stored, its scales or None, the values attention must see in float32)."""
    if kv_dtype is None:
        return cache, None, cache.float()
    if kv_dtype == torch.int8:
        q, s = quantize_kv_int8(cache)
        return q, s, q.float() * s[..., None]
    narrow = cache.to(kv_dtype)
    return narrow, None, narrow.float()


def _run(
    query_lens,
    seq_lens,
    num_heads,
    num_kv_heads,
    head_size,
    block_size,
    dtype,
    large_ids=False,
    kv_dtype=None,
    fused=False,
):
    gen = torch.Generator().manual_seed(hash((tuple(query_lens), num_heads, head_size)) % 2**31)
    num_blocks = 4096 if large_ids else 512
    tables = _random_batch(query_lens, seq_lens, num_blocks, block_size, gen, large_ids)
    # Reference layout [num_blocks, block_size, kv_heads, head]; ours is heads-outer.
    k_ref = torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=gen).to(dtype)
    v_ref = torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=gen).to(dtype)
    k_ours, k_s, k_seen = _narrow(k_ref.permute(2, 0, 1, 3).contiguous(), kv_dtype)
    v_ours, v_s, v_seen = _narrow(v_ref.permute(2, 0, 1, 3).contiguous(), kv_dtype)
    # The reference attends over exactly what a narrower cache holds, in the query's dtype.
    k_ref = k_seen.permute(1, 2, 0, 3).to(dtype)
    v_ref = v_seen.permute(1, 2, 0, 3).to(dtype)
    q = torch.randn(sum(query_lens), num_heads, head_size, generator=gen).to(dtype)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    scale = head_size**-0.5
    out_ref = torch.full_like(q, float("nan"))
    paged_attention(
        q, k_ref, v_ref, bt, torch.tensor(seq_lens, dtype=torch.int32), qsl, scale, out_ref
    )
    # fused: the C++ decode and prefill kernels (a bfloat16 query takes torch's prefill path)
    meta = build_metadata(query_lens, seq_lens, tables, block_size, fused, fused)
    out = attend(q, LayerKV(k_ours, v_ours, k_s, v_s), meta, scale)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (9, 3), (8, 1)])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_only(dtype, heads, head_size, block_size):
    seq_lens = [1, 5, 16, 17, 33, 100, 64, 250] * 3  # > one decode group, ragged lengths
    seq_lens.sort()  # the runner orders decodes by length
    _run([1] * len(seq_lens), seq_lens, *heads, head_size, block_size, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (9, 3)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_prefill_and_decode(dtype, heads, block_size):
    # decodes first, then: a fresh prompt, a chunk after a cached prefix, a 1-token tail chunk
    query_lens = [1, 1, 1, 37, 20, 2]
    seq_lens = [9, 40, 71, 37, 85, 50]
    _run(query_lens, seq_lens, *heads, 64, block_size, dtype)


def test_large_block_ids():
    _run([1, 1, 30], [20, 300, 90], 8, 2, 64, 16, torch.float32, large_ids=True)


def _kernels_or_skip():
    if cpu_ops.load() is None:
        pytest.skip(f"the C++ CPU kernels could not be built here: {cpu_ops.load_error()}")


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (9, 3), (8, 1), (12, 4)])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_kernel(heads, head_size, block_size):
    """cpu_ops.paged_prefill beside fused decodes: chunks shorter and longer than a query tile
    (32 tokens) and a key tile (128 keys), fresh prompts and chunks after a cached prefix,
    1-token and 2-token tails, a chunk ending exactly on a tile edge."""
    _kernels_or_skip()
    query_lens = [1, 1, 1, 200, 37, 1, 2, 33, 128, 64]
    seq_lens = [9, 40, 71, 200, 300, 50, 130, 170, 128, 384]
    _run(query_lens, seq_lens, *heads, head_size, block_size, torch.float32, fused=True)


def test_prefill_kernel_large_block_ids():
    _kernels_or_skip()
    _run([1, 300, 30], [20, 300, 900], 8, 2, 64, 16, torch.float32, large_ids=True, fused=True)


def test_prefill_kernel_reads_strided_rows_and_rejects_bad_input():
    """The query may be a view into the qkv rows (the runner's case); bad shapes, dtypes and
    block ids are clear errors, not reads out of bounds."""
    _kernels_or_skip()
    gen = torch.Generator().manual_seed(3)
    kvh, heads, hd, bs, nb, n, seq = 2, 4, 64, 16, 8, 20, 50
    k, v = torch.randn(2, kvh, nb, bs, hd, generator=gen)
    qkv = torch.randn(n, (heads + 2 * kvh) * hd, generator=gen)
    q = qkv[:, : heads * hd].view(n, heads, hd)
    blocks = torch.tensor([5, 0, 7, 2])
    got = cpu_ops.paged_prefill(q, k, v, blocks, seq, hd**-0.5)
    want = cpu_ops.paged_prefill(q.contiguous(), k, v, blocks, seq, hd**-0.5)
    assert torch.equal(got, want)
    meta = build_metadata([n], [seq], [blocks.tolist()], bs)  # the torch path
    torch.testing.assert_close(got, attend(q.contiguous(), LayerKV(k, v), meta, hd**-0.5))
    with pytest.raises(RuntimeError, match="block id out of range"):
        cpu_ops.paged_prefill(q, k, v, torch.tensor([5, 0, 8, 2]), seq, hd**-0.5)
    with pytest.raises(RuntimeError, match="too few blocks"):
        cpu_ops.paged_prefill(q, k, v, blocks[:3], seq, hd**-0.5)
    with pytest.raises(RuntimeError, match="shorter than the chunk"):
        cpu_ops.paged_prefill(q, k, v, blocks, n - 1, hd**-0.5)
    with pytest.raises(RuntimeError, match="int8 cache needs"):
        cpu_ops.paged_prefill(q, k.to(torch.int8), v.to(torch.int8), blocks, seq, hd**-0.5)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_ops.paged_prefill(*(x[..., :40].contiguous() for x in (q, k, v)), blocks, seq, 0.1)


KV_DTYPES = [torch.bfloat16, torch.float16, torch.int8]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_narrower_kv_cache(kv_dtype, dtype, fused):
    """--kv-cache-dtype: decodes (gathered groups, or the fused C++ kernel) and prefill chunks
    over a bf16 / fp16 / int8 cache equal attention over the values the cache holds."""
    if fused and cpu_ops.load() is None:
        pytest.skip("the C++ CPU kernels could not be built here")
    query_lens = [1, 1, 1, 1, 37, 20]
    seq_lens = [9, 17, 40, 71, 37, 85]
    _run(query_lens, seq_lens, 9, 3, 64, 16, dtype, kv_dtype=kv_dtype, fused=fused)


@pytest.mark.parametrize("kernels", [False, True])
def test_write_kv_matches_reshape_and_cache(kernels, monkeypatch):
    if kernels and cpu_ops.load() is None:
        pytest.skip("the C++ CPU kernels could not be built here")
    if not kernels:
        monkeypatch.setattr(cpu_ops, "load", lambda: None)  # the torch path
    gen = torch.Generator().manual_seed(0)
    nb, bs, kvh, hd = 32, 16, 2, 8
    key, value = torch.randn(2, 40, kvh, hd, generator=gen)
    slots = torch.randperm(nb * bs, generator=gen)[:40]
    k_ref, v_ref = torch.zeros(nb, bs, kvh, hd), torch.zeros(nb, bs, kvh, hd)
    reshape_and_cache(key, value, k_ref, v_ref, slots)
    k, v = torch.zeros(kvh, nb, bs, hd), torch.zeros(kvh, nb, bs, hd)
    write_kv(key, value, LayerKV(k, v), slots)
    assert torch.equal(k, k_ref.permute(2, 0, 1, 3))
    assert torch.equal(v, v_ref.permute(2, 0, 1, 3))
    # padding slots (-1) are skipped by the reference
    before = k_ref.clone()
    reshape_and_cache(key[:3], value[:3], k_ref, v_ref, torch.tensor([-1, -1, -1]))
    assert torch.equal(before, k_ref)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", [False, True])
def test_write_kv_to_a_narrower_cache(kv_dtype, src_dtype, kernels, monkeypatch):
    """bf16 / fp16: converted; int8: quantized per token and head as quantize_kv_int8 does (the
    C++ op may round a value exactly halfway between two steps the other way: +-1 at most),
    scales in their own tensor; untouched slots stay as they were. Keys that are views into a
    qkv row (the runner's case) are read in place."""
    if kernels and cpu_ops.load() is None:
        pytest.skip("the C++ CPU kernels could not be built here")
    if not kernels:
        monkeypatch.setattr(cpu_ops, "load", lambda: None)
    gen = torch.Generator().manual_seed(1)
    nb, bs, kvh, hd, n = 16, 8, 3, 64, 21
    qkv = (torch.randn(n, (6 + 2 * kvh) * hd, generator=gen) * 3).to(src_dtype)
    qkv[4, 6 * hd : 7 * hd] = 0  # an all-zero key head
    key = qkv[:, 6 * hd : (6 + kvh) * hd].view(n, kvh, hd)
    value = qkv[:, (6 + kvh) * hd :].view(n, kvh, hd)
    slots = torch.randperm(nb * bs, generator=gen)[:n]
    k = torch.full((kvh, nb, bs, hd), 7, dtype=kv_dtype)
    v = torch.full((kvh, nb, bs, hd), 7, dtype=kv_dtype)
    scaled = kv_dtype == torch.int8
    ks, vs = (
        (torch.full((kvh, nb, bs), 5.0), torch.full((kvh, nb, bs), 5.0)) if scaled else (None, None)
    )
    write_kv(key, value, LayerKV(k, v, ks, vs), slots)
    blocks, offs = slots // bs, slots % bs
    for x, cache, scales in ((key, k, ks), (value, v, vs)):
        got = cache[:, blocks, offs].transpose(0, 1)  # [n, kvh, hd]
        if scaled:
            want_q, want_s = quantize_kv_int8(x)
            assert (got.int() - want_q.int()).abs().max() <= 1
            assert (got.int() != want_q.int()).float().mean() < 0.01
            torch.testing.assert_close(scales[:, blocks, offs].transpose(0, 1), want_s)
        else:
            assert torch.equal(got, x.to(kv_dtype))
    if scaled:
        assert ks[0, blocks[4], offs[4]] == 1 and not k[0, blocks[4], offs[4]].any()
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots] = False
    assert (k.view(kvh, -1, hd)[:, untouched] == 7).all()


def test_quantize_kv_int8_error_is_within_half_a_step():
    x = torch.randn(50, 4, 64) * torch.logspace(-3, 2, 50)[:, None, None]
    q, s = quantize_kv_int8(x)
    assert q.dtype == torch.int8 and s.shape == (50, 4) and q.abs().max() <= 127
    assert ((q.float() * s[..., None] - x).abs() <= s[..., None] / 2 + 1e-6).all()


def test_rms_norm_and_rotary_references_match_transformers():
    pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as ml

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 32, generator=gen), torch.randn(32, generator=gen)
    hf_norm = ml.LlamaRMSNorm(32, eps=1e-5)
    hf_norm.weight.data = w
    torch.testing.assert_close(rms_norm(x, w, 1e-5), hf_norm(x))

    q, k = torch.randn(7, 4, 16, generator=gen), torch.randn(7, 2, 16, generator=gen)
    pos = torch.tensor([0, 1, 2, 10, 11, 100, 3])
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    freqs = torch.outer(torch.arange(128).float(), inv)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    rq, rk = rotary_embedding(pos, q, k, cache)
    emb = torch.cat((freqs[pos], freqs[pos]), dim=-1)
    cos, sin = emb.cos()[None], emb.sin()[None]  # [1, T, 16]
    hq, hk = ml.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(rq, hq[0].transpose(0, 1))
    torch.testing.assert_close(rk, hk[0].transpose(0, 1))
