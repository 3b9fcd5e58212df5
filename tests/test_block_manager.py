"""Block manager: exact block ids, eviction order, prefix hits and invariants."""

from __future__ import annotations

import random

import pytest

from engine_svc.core.block_manager import BlockManager

BS = 16


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def counts(bm: BlockManager) -> tuple[int, int, int]:
    """(free, used, cached)."""
    return bm.num_free_blocks(), bm.num_used_blocks(), bm.num_cached_blocks()


def snapshot(bm: BlockManager) -> tuple:
    """Everything allocate may touch, private state included, to prove a refusal changed nothing."""
    tables = {r: list(q.blocks) for r, q in bm._reqs.items()}
    return (tables, list(bm._free_queue), list(bm._ref), list(bm._hash), dict(bm._cached),
            counts(bm), bm.hit_stats())  # fmt: skip


# ---- allocation ------------------------------------------------------------------------------


def test_fresh_manager_hands_out_ids_in_queue_order() -> None:
    bm = BlockManager(10, BS)
    assert counts(bm) == (10, 0, 0)
    assert bm.allocate("a", toks(0, 40), 40)
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.allocate("b", toks(100, 20), 20)
    assert bm.block_table("b") == [3, 4]
    assert counts(bm) == (5, 5, 0)
    assert bm.num_allocatable_blocks() == 5
    assert bm.usage() == 0.5
    bm.check_invariants()


def test_zero_tokens_gets_no_block_and_unknown_ids_are_harmless() -> None:
    bm = BlockManager(4, BS)
    assert bm.allocate("a", [], 0)
    assert bm.block_table("a") == []
    assert bm.block_table("nope") == []
    bm.free("nope")
    assert counts(bm) == (4, 0, 0)
    bm.check_invariants()


def test_allocate_refuses_without_changing_anything() -> None:
    bm = BlockManager(4, BS)
    assert bm.allocate("a", toks(0, 48), 48)  # blocks 0, 1, 2
    before = snapshot(bm)
    assert not bm.allocate("b", toks(100, 17), 17)  # needs 2, 1 left
    assert not bm.allocate("a", toks(0, 48), 48 + 17)  # growing a by 2 blocks
    assert snapshot(bm) == before
    assert bm.block_table("b") == []
    assert bm.allocate("b", toks(100, 16), 16)
    assert bm.block_table("b") == [3]
    bm.check_invariants()


def test_revived_cached_blocks_count_as_consumed() -> None:
    bm = BlockManager(4, 4)
    assert bm.allocate("a", toks(0, 12), 12)  # [0, 1, 2], all full and hashed
    bm.free("a")
    assert counts(bm) == (1, 0, 3)
    prompt = toks(0, 12) + toks(50, 5)  # 17 tokens: 5 blocks, 3 of them hits
    hit, n = bm.find_cached_prefix(prompt)
    assert (hit, n) == ([0, 1, 2], 12)
    before = snapshot(bm)
    # 2 new blocks + 3 revived = 5 > 4 allocatable, although the queue holds 4 entries.
    assert not bm.allocate("b", prompt, 17, hit)
    assert snapshot(bm) == before
    assert bm.allocate("b", prompt[:13], 13, hit)  # 1 new + 3 revived = 4
    assert bm.block_table("b") == [0, 1, 2, 3]
    assert counts(bm) == (0, 4, 0)
    bm.check_invariants()


def test_decode_steps_append_a_block_every_block_size_tokens() -> None:
    bm = BlockManager(8, 4)
    tokens = toks(0, 5)
    assert bm.allocate("a", tokens, 5)
    assert bm.block_table("a") == [0, 1]
    assert bm.allocate("b", toks(100, 4), 4)  # takes block 2 in between
    table_lengths = []
    while len(tokens) < 17:
        tokens.append(len(tokens))
        assert bm.allocate("a", tokens, len(tokens))
        table_lengths.append(len(bm.block_table("a")))
        bm.check_invariants()
    # lengths 6..17: a new block at tokens 9, 13 and 17
    assert table_lengths == [2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5]
    assert bm.block_table("a") == [0, 1, 3, 4, 5]
    assert bm.block_table("b") == [2]


def test_block_table_is_append_only_and_live() -> None:
    bm = BlockManager(8, 4)
    assert bm.allocate("a", toks(0, 4), 4)
    table = bm.block_table("a")
    assert bm.allocate("a", toks(0, 8), 8)
    assert table == [0, 1]
    assert bm.allocate("a", toks(0, 8), 3)  # fewer slots than before: nothing is released
    assert bm.block_table("a") == [0, 1]


def test_slots_reserved_beyond_known_tokens_are_hashed_once_known() -> None:
    bm = BlockManager(8, 4)
    prompt = toks(0, 10)
    assert bm.allocate("a", prompt, 17)  # 5 blocks, only 2 of them full of known tokens
    assert bm.block_table("a") == [0, 1, 2, 3, 4]
    probe = toks(0, 17)
    assert bm.find_cached_prefix(probe) == ([0, 1], 8)
    assert bm.allocate("a", probe, 17)  # tokens now known: blocks 2 and 3 get hashed
    assert bm.block_table("a") == [0, 1, 2, 3, 4]
    assert bm.find_cached_prefix(probe) == ([0, 1, 2, 3], 16)
    bm.check_invariants()


# ---- prefix caching --------------------------------------------------------------------------

PREFIX = toks(1000, 48)  # three full blocks


def manager_with_freed_a(**kwargs) -> BlockManager:
    """A = PREFIX + 5 tokens on blocks [0, 1, 2, 3], then freed."""
    bm = BlockManager(10, BS, **kwargs)
    assert bm.allocate("a", PREFIX + [1, 2, 3, 4, 5], 53, salt=kwargs.get("salt"))
    assert bm.block_table("a") == [0, 1, 2, 3]
    bm.free("a")
    return bm


def test_shared_prefix_returns_the_freed_requests_blocks() -> None:
    bm = manager_with_freed_a()
    assert counts(bm) == (7, 0, 3)  # block 3 was partial: plain free
    prompt = PREFIX + toks(7, 7)
    hit, n = bm.find_cached_prefix(prompt)
    assert (hit, n) == ([0, 1, 2], 48)
    assert counts(bm) == (7, 0, 3)  # a pure query
    assert bm.allocate("b", prompt, len(prompt), hit)
    # queue was 4..9, 3, 2, 1, 0: hits leave from the middle, the new block from the head
    assert bm.block_table("b") == [0, 1, 2, 4]
    assert counts(bm) == (6, 4, 0)
    assert bm.hit_stats() == (53 + 55, 48)
    bm.check_invariants()


def test_hit_is_capped_so_the_last_token_is_computed() -> None:
    bm = manager_with_freed_a()
    assert bm.find_cached_prefix(PREFIX) == ([0, 1], 32)
    assert bm.find_cached_prefix(PREFIX + [0]) == ([0, 1, 2], 48)
    assert bm.find_cached_prefix(PREFIX[:16]) == ([], 0)
    assert bm.find_cached_prefix(PREFIX[:17]) == ([0], 16)
    assert bm.find_cached_prefix([]) == ([], 0)


def test_salt_separates_caches() -> None:
    bm = BlockManager(10, BS)
    assert bm.allocate("a", PREFIX + [1], 49, salt=b"user-1")
    prompt = PREFIX + [2]
    assert bm.find_cached_prefix(prompt, salt=b"user-1") == ([0, 1, 2], 48)
    assert bm.find_cached_prefix(prompt, salt=b"user-2") == ([], 0)
    assert bm.find_cached_prefix(prompt) == ([], 0)
    assert bm.find_cached_prefix(prompt, salt=b"") == ([], 0)


def test_hashes_chain_over_the_whole_prefix() -> None:
    bm = manager_with_freed_a()
    changed_block_2 = PREFIX[:20] + [7] + PREFIX[21:] + [0]
    assert bm.find_cached_prefix(changed_block_2) == ([0], 16)
    changed_block_3 = PREFIX[:40] + [7] + PREFIX[41:] + [0]
    assert bm.find_cached_prefix(changed_block_3) == ([0, 1], 32)
    # blocks 2 and 3 equal A's, but their parents differ: no hit at all
    changed_block_1 = [7] + PREFIX[1:] + [0]
    assert bm.find_cached_prefix(changed_block_1) == ([], 0)


def test_disabled_prefix_caching_never_hashes() -> None:
    bm = manager_with_freed_a(enable_prefix_caching=False)
    assert counts(bm) == (10, 0, 0)
    assert bm.find_cached_prefix(PREFIX + [0]) == ([], 0)
    assert bm.hit_stats() == (0, 0)
    with pytest.raises(ValueError):
        bm.allocate("b", PREFIX + [0], 49, [0])


def test_stale_hit_is_rejected() -> None:
    bm = BlockManager(3, 4)
    assert bm.allocate("a", toks(0, 8), 8)  # [0, 1] hashed
    bm.free("a")  # queue: 2, 1, 0
    hit, _ = bm.find_cached_prefix(toks(0, 9))
    assert hit == [0, 1]
    assert bm.allocate("c", toks(50, 12), 12)  # evicts and overwrites 1 and 0
    bm.free("c")
    with pytest.raises(ValueError, match="stale"):
        bm.allocate("b", toks(0, 9), 9, hit)
    bm.check_invariants()


def test_cached_blocks_only_on_first_call() -> None:
    bm = manager_with_freed_a()
    hit, _ = bm.find_cached_prefix(PREFIX + [0])
    assert bm.allocate("b", toks(0, 4), 4)
    with pytest.raises(ValueError):
        bm.allocate("b", PREFIX + [0], 49, hit)


# ---- reference counts --------------------------------------------------------------------------


def test_live_requests_share_prefix_blocks() -> None:
    bm = BlockManager(10, BS)
    a_prompt = PREFIX + [1, 2, 3, 4, 5]
    assert bm.allocate("a", a_prompt, 53)  # [0, 1, 2, 3]
    b_prompt = PREFIX + [9]
    hit, n = bm.find_cached_prefix(b_prompt)
    assert (hit, n) == ([0, 1, 2], 48)
    assert bm.allocate("b", b_prompt, 49, hit)
    assert bm.block_table("b") == [0, 1, 2, 4]
    assert bm._ref[:5] == [2, 2, 2, 1, 1]
    assert counts(bm) == (5, 5, 0)
    bm.free("a")
    assert bm._ref[:5] == [1, 1, 1, 0, 1]
    assert counts(bm) == (6, 4, 0)  # shared blocks stay used; a's tail is plain free
    bm.free("b")
    assert counts(bm) == (7, 0, 3)
    assert bm.find_cached_prefix(b_prompt) == ([0, 1, 2], 48)
    bm.check_invariants()


def test_same_block_computed_twice_keeps_the_first_entry() -> None:
    bm = BlockManager(10, 4)
    prompt = toks(0, 9)
    assert bm.allocate("a", prompt, 9)  # [0, 1, 2]
    assert bm.allocate("b", prompt, 9)  # no hit passed: [3, 4, 5], private
    assert bm.find_cached_prefix(prompt) == ([0, 1], 8)
    bm.free("a")
    bm.free("b")
    assert counts(bm) == (8, 0, 2)  # b's copies are plain free
    assert bm.find_cached_prefix(prompt) == ([0, 1], 8)
    bm.check_invariants()


def test_reset_prefix_cache_keeps_hashes_of_blocks_in_use() -> None:
    bm = manager_with_freed_a()
    assert bm.allocate("b", PREFIX[:16] + [0], 17, [0])
    assert not bm.reset_prefix_cache()  # block 0 is in use and hashed
    assert counts(bm) == (8, 2, 0)
    assert bm.find_cached_prefix(PREFIX + [0]) == ([0], 16)
    bm.free("b")
    assert bm.reset_prefix_cache()
    assert counts(bm) == (10, 0, 0)
    assert bm.find_cached_prefix(PREFIX + [0]) == ([], 0)
    bm.check_invariants()


# ---- eviction order ------------------------------------------------------------------------------


def test_eviction_order_is_exact() -> None:
    bm = BlockManager(8, 4)
    a_prompt = toks(0, 14)  # [0, 1, 2, 3]: 0..2 hashed, 3 partial
    b_prompt = toks(100, 9)  # [4, 5, 6]: 4, 5 hashed, 6 partial
    assert bm.allocate("a", a_prompt, 14)
    assert bm.allocate("b", b_prompt, 9)
    bm.free("a")
    bm.free("b")
    # queue: 7 (never used), then a (freed first) tail first, then b tail first
    assert counts(bm) == (3, 0, 5)
    c_tokens = toks(500, 32)
    handed_out, a_hits, b_hits = [], [], []
    for step in range(1, 9):
        assert bm.allocate("c", c_tokens, 4 * step)
        handed_out.append(bm.block_table("c")[-1])
        a_hits.append(bm.find_cached_prefix(a_prompt)[0])
        b_hits.append(bm.find_cached_prefix(b_prompt)[0])
        bm.check_invariants()
    assert handed_out == [7, 3, 2, 1, 0, 6, 5, 4]
    assert a_hits == [[0, 1, 2], [0, 1, 2], [0, 1], [0], [], [], [], []]
    assert b_hits == [[4, 5]] * 5 + [[4, 5], [4], []]
    assert not bm.allocate("c", c_tokens, 33)


def test_revived_block_leaves_the_middle_of_the_queue() -> None:
    bm = BlockManager(6, 4)
    assert bm.allocate("a", toks(0, 9), 9)  # [0, 1, 2]
    bm.free("a")  # queue: 3, 4, 5, 2, 1, 0
    hit, _ = bm.find_cached_prefix(toks(0, 8) + [99])
    assert hit == [0, 1]
    assert bm.allocate("b", toks(0, 8) + [99], 9, hit)
    assert bm.block_table("b") == [0, 1, 3]
    assert bm.allocate("c", toks(200, 12), 12)
    assert bm.block_table("c") == [4, 5, 2]
    assert bm.num_allocatable_blocks() == 0
    assert not bm.allocate("d", [1], 1)
    bm.check_invariants()


# ---- invariants --------------------------------------------------------------------------------


def corrupt_ref(bm: BlockManager) -> None:
    bm._ref[0] += 1


def corrupt_negative_ref(bm: BlockManager) -> None:
    bm._ref[5] = -1


def corrupt_queue_drop(bm: BlockManager) -> None:
    del bm._free_queue[5]


def corrupt_queue_used(bm: BlockManager) -> None:
    bm._free_queue[0] = None


def corrupt_hash_map(bm: BlockManager) -> None:
    digest = bm._hash[0]
    bm._cached[digest] = 1


def corrupt_stray_hash(bm: BlockManager) -> None:
    bm._hash[5] = b"x" * 32


def corrupt_evictable_count(bm: BlockManager) -> None:
    bm._num_evictable += 1


def corrupt_table(bm: BlockManager) -> None:
    bm._reqs["a"].blocks.append(6)


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_ref,
        corrupt_negative_ref,
        corrupt_queue_drop,
        corrupt_queue_used,
        corrupt_hash_map,
        corrupt_stray_hash,
        corrupt_evictable_count,
        corrupt_table,
    ],
)
def test_check_invariants_detects_corruption(corrupt) -> None:
    bm = BlockManager(8, 4)
    assert bm.allocate("a", toks(0, 9), 9)  # [0, 1, 2], 0 and 1 hashed
    bm.check_invariants()
    corrupt(bm)
    with pytest.raises(RuntimeError, match="invariant"):
        bm.check_invariants()


def test_randomized_simulation_keeps_invariants_and_kv_content() -> None:
    """Random admissions (with hits), chunked prefill, decode and frees on a tight pool.

    A fake KV store records which token each slot holds, as the runner would write it; every
    hit must return blocks whose slots hold exactly the hitting prompt's tokens, and no write
    may land in a block another live request holds.
    """
    rng = random.Random(1234)
    bs, num_blocks = 4, 48
    bm = BlockManager(num_blocks, bs)
    kv: dict[int, list[int | None]] = {b: [None] * bs for b in range(num_blocks)}
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 20))] for _ in range(4)]
    live: dict[str, tuple[list[int], int]] = {}  # id -> (tokens, slots allocated)
    refused = hits = evictions = 0

    def write(req_id: str, tokens: list[int], start: int, end: int) -> None:
        table = bm.block_table(req_id)
        holders = [bm.block_table(r) for r in live if r != req_id]
        for pos in range(start, min(end, len(tokens))):
            block = table[pos // bs]
            assert not any(block in t for t in holders), "write into a shared block"
            kv[block][pos % bs] = tokens[pos]

    for step in range(2000):
        num_hashes = len(bm._cached)  # only an eviction removes entries
        op = rng.random()
        if op < 0.3 or not live:
            req_id = f"r{step}"
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            salt = rng.choice([None, None, b"s"])
            hit, n = bm.find_cached_prefix(tokens, salt)
            for i, block in enumerate(hit):
                assert kv[block] == tokens[i * bs : (i + 1) * bs]
            chunk = min(len(tokens), n + rng.randrange(1, 12))
            before = snapshot(bm)
            if bm.allocate(req_id, tokens, chunk, hit, salt):
                live[req_id] = (tokens, chunk)
                write(req_id, tokens, n, chunk)
                hits += n > 0
            else:
                assert snapshot(bm) == before
                refused += 1
        elif op < 0.8:
            req_id = rng.choice(sorted(live))
            tokens, done = live[req_id]
            if done >= len(tokens):  # decode: sample one token and reserve its slot
                tokens.append(rng.randrange(50))
            end = min(len(tokens), done + rng.randrange(1, 6))
            before = snapshot(bm)
            if bm.allocate(req_id, tokens, end):
                assert len(bm.block_table(req_id)) == -(-end // bs)
                write(req_id, tokens, done, end)
                live[req_id] = (tokens, end)
            else:
                assert snapshot(bm) == before
                refused += 1
        else:
            req_id = rng.choice(sorted(live))
            bm.free(req_id)
            del live[req_id]
        evictions += len(bm._cached) < num_hashes
        bm.check_invariants()
        free, used, cached = counts(bm)
        assert free + used + cached == num_blocks

    for req_id in list(live):
        bm.free(req_id)
    bm.check_invariants()
    assert bm.num_allocatable_blocks() == num_blocks
    assert bm.num_used_blocks() == 0
    # the run exercised what it claims to: hits, refusals and evictions
    assert hits > 50 and refused > 20 and evictions > 50
    queried, hit_tokens = bm.hit_stats()
    assert 0 < hit_tokens < queried


def test_forget_uncomputed_unregisters_only_blocks_past_the_computed_tokens() -> None:
    """After a failed step: blocks past the tokens computed before it lose their hash (their KV
    may be garbage) and come back plain free; the blocks before keep theirs."""
    bm = BlockManager(10, BS)
    assert bm.allocate("a", PREFIX + [1, 2], 50)  # blocks 0-2 full and registered
    bm.forget_uncomputed("a", 17)  # block 0 was written before the step; 1 and 2 were not
    bm.forget_uncomputed("gone", 0)  # an unknown request is a no-op
    assert bm.find_cached_prefix(PREFIX + [0]) == ([0], 16)
    bm.free("a")
    assert counts(bm) == (9, 0, 1)
    bm.check_invariants()
