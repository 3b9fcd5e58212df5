"""Routing over data-parallel engine replicas: which engine a tokenizer worker sends a request
to (``route``), by load and prefix-cache affinity, and what the worker knows of each engine
(``EngineLink``).

Pure bookkeeping: the worker owns the sockets and feeds in the engines' statuses; nothing here
sends or receives. Every worker routes a new prefix the same way (``prefix_chain``, ``route``).
"""

from __future__ import annotations

import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from protos.pagedserve.internal.v1 import ipc_pb2
from protos.transport import DEAD_AFTER_S

if TYPE_CHECKING:
    import zmq

AFFINITY_BLOCKS = 64  # prompt blocks a request's prefix is matched over
AFFINITY_MEMORY = 100_000  # prefix hashes remembered per engine (least recently used go)
BALANCE_SLACK = 8  # sequences an engine may carry over the least loaded one and still be picked


class EngineLink:
    """One engine as this worker sees it: its socket, last status and routing memory."""

    def __init__(self, index: int, address: str) -> None:
        self.index, self.address = index, address
        self.sock: zmq.Socket | None = None
        self.status: ipc_pb2.EngineStatus | None = None
        self.seen = 0.0
        self.sent = 0  # sequences sent to this address ever (AddRequest.serial of the last)
        self.base = 0  # self.sent when the process now there started (see load)
        self.refused = ""  # why it is not used although ready: it serves another model
        self.key = zlib.crc32(address.encode())  # the same in every worker process
        self.prefixes: OrderedDict[int, None] = OrderedDict()

    @property
    def alive(self) -> bool:
        return (
            self.status is not None
            and self.status.ready
            and time.monotonic() - self.seen < DEAD_AFTER_S
        )

    @property
    def ready(self) -> bool:
        return self.alive and not self.refused

    @property
    def load(self) -> int:
        """Sequences running or waiting there, plus those this worker sent that it has not
        taken in yet (an engine reads its inbox between steps)."""
        if self.status is None:
            return self.sent - self.base
        s = self.status.stats
        # What was sent before a restart was noticed ran on the old process, or reaches the
        # new one and is aborted there: it is not load.
        taken = max(self.status.seqs_added, self.base)
        return s.num_running + s.num_waiting + self.sent - taken

    def matched(self, chain: Sequence[int]) -> int:
        """Leading prompt blocks of ``chain`` that were sent here (and may still be cached)."""
        n = 0
        while n < len(chain) and chain[n] in self.prefixes:
            n += 1
        return n

    def remember(self, chain: Sequence[int]) -> None:
        for h in chain:
            self.prefixes[h] = None
            self.prefixes.move_to_end(h)
        while len(self.prefixes) > AFFINITY_MEMORY:
            self.prefixes.popitem(last=False)

    def state(self) -> ipc_pb2.EngineState:
        st = ipc_pb2.EngineState(address=self.address, ready=self.ready, error=self.refused)
        if self.status is not None:
            st.instance = self.status.instance
            st.stats.CopyFrom(self.status.stats)
            st.error = self.refused or self.status.error
        return st


def prefix_chain(ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the prompt's full blocks that a prefix cache could hold (the last
    token is always computed), at most AFFINITY_BLOCKS. Hashes of ints and tuples are the same
    in every process, so every worker routes a prefix the same way."""
    chain, h = [], 0
    n = min((len(ids) - 1) // block_size, AFFINITY_BLOCKS) if block_size > 0 else 0
    for b in range(n):
        h = hash((h, tuple(ids[b * block_size : (b + 1) * block_size])))
        chain.append(h)
    return chain


def route(engines: Sequence[EngineLink], chain: Sequence[int]) -> EngineLink:
    """Pick the engine for a request with this prefix chain among ready ``engines``.

    Only engines within a margin of the least loaded one compete (``BALANCE_SLACK``
    sequences, or a quarter of the least load if more). Among those, the one that was sent
    the longest run of this prompt's leading blocks wins, so requests sharing a prefix find
    it cached; a prefix new to all of them goes where rendezvous hashing of its first block
    points (the same engine from every worker); a prompt shorter than a block goes to the
    least loaded engine.
    """
    least = min(e.load for e in engines)
    fair = [e for e in engines if e.load <= least + max(BALANCE_SLACK, least // 4)]
    best, best_len = None, 0
    for e in fair:
        n = e.matched(chain)
        if n > best_len or (n and n == best_len and e.load < best.load):
            best, best_len = e, n
    if best is None:
        if chain:
            best = max(fair, key=lambda e: hash((chain[0], e.key)))
        else:
            best = min(fair, key=lambda e: (e.load, e.index))
    return best
