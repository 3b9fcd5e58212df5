"""CPU paged attention (engine_svc.runner.attention) against the plain-torch kernel references."""

from __future__ import annotations

import pytest
import torch

from engine_svc.runner.attention import attend, build_metadata, write_kv
from kernels.reference import paged_attention, reshape_and_cache, rms_norm, rotary_embedding

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


def _run(
    query_lens, seq_lens, num_heads, num_kv_heads, head_size, block_size, dtype, large_ids=False
):
    gen = torch.Generator().manual_seed(hash((tuple(query_lens), num_heads, head_size)) % 2**31)
    num_blocks = 4096 if large_ids else 512
    tables = _random_batch(query_lens, seq_lens, num_blocks, block_size, gen, large_ids)
    # Reference layout [num_blocks, block_size, kv_heads, head]; ours is heads-outer.
    k_ref = torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=gen).to(dtype)
    v_ref = torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=gen).to(dtype)
    k_ours = k_ref.permute(2, 0, 1, 3).contiguous()
    v_ours = v_ref.permute(2, 0, 1, 3).contiguous()
    q = torch.randn(sum(query_lens), num_heads, head_size, generator=gen).to(dtype)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    scale = head_size**-0.5
    out_ref = torch.full_like(q, float("nan"))
    paged_attention(
        q, k_ref, v_ref, bt, torch.tensor(seq_lens, dtype=torch.int32), qsl, scale, out_ref
    )
    meta = build_metadata(query_lens, seq_lens, tables, block_size)
    out = attend(q, k_ours, v_ours, meta, scale)
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


def test_write_kv_matches_reshape_and_cache():
    gen = torch.Generator().manual_seed(0)
    nb, bs, kvh, hd = 32, 16, 2, 8
    key, value = torch.randn(2, 40, kvh, hd, generator=gen)
    slots = torch.randperm(nb * bs, generator=gen)[:40]
    k_ref, v_ref = torch.zeros(nb, bs, kvh, hd), torch.zeros(nb, bs, kvh, hd)
    reshape_and_cache(key, value, k_ref, v_ref, slots)
    k, v = torch.zeros(kvh, nb, bs, hd), torch.zeros(kvh, nb, bs, hd)
    write_kv(key, value, k, v, slots)
    assert torch.equal(k, k_ref.permute(2, 0, 1, 3))
    assert torch.equal(v, v_ref.permute(2, 0, 1, 3))
    # padding slots (-1) are skipped by the reference
    before = k_ref.clone()
    reshape_and_cache(key[:3], value[:3], k_ref, v_ref, torch.tensor([-1, -1, -1]))
    assert torch.equal(before, k_ref)


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
