"""The fused C++ CPU decode kernel against ``kernels.reference.paged_attention``.

Random inputs each run (seed printed), blocks that no sequence owns are filled with NaN (a
read out of range would poison the output), GQA ratios with and without a compiled
specialisation, head sizes 64/128 and an odd one, block sizes 16/32, float32 and bfloat16,
and one case with block ids near the top of a large cache.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine_svc import cpu_decode
from kernels import reference

pytestmark = pytest.mark.skipif(
    cpu_decode.load() is None, reason="the C++ CPU kernel could not be built here"
)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}


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
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
    return q, kc, vc, bt, torch.tensor(lens, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(
    "num_heads,kv_heads,head_size",
    [(9, 3, 64), (4, 4, 128), (8, 2, 64), (6, 1, 128), (10, 2, 48), (14, 2, 64)],
)
def test_matches_reference(num_heads, kv_heads, head_size, block_size, dtype):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    lens = [1, 2, block_size, block_size + 1, 3 * block_size - 1, 200]
    q, kc, vc, bt, sl = _case(
        num_heads, kv_heads, head_size, block_size, dtype, lens, 64, False, gen
    )
    _check(q, kc, vc, bt, sl, dtype, seed)


def test_large_block_ids():
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    q, kc, vc, bt, sl = _case(8, 2, 64, 16, torch.float32, [700, 33], 40_000, True, gen)
    assert bt.max().item() == 39_999
    _check(q, kc, vc, bt, sl, torch.float32, seed)


def _check(q, kc, vc, bt, sl, dtype, seed):
    scale = q.shape[2] ** -0.5
    out = cpu_decode.paged_decode(q, kc, vc, bt, sl, scale)
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
        cpu_decode.paged_decode(q, kc, vc, bt.clone().fill_(99), sl, 0.125)
    with pytest.raises(RuntimeError, match="seq_lens"):
        cpu_decode.paged_decode(q, kc, vc, bt, sl + 1000, 0.125)
