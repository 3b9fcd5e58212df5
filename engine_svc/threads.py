"""How many intra-op threads the CPU engine runs while other work shares its cores.

A parallel region (an OpenMP loop in torch or in our kernels) ends when its last thread does.
With two threads on two cores and another process busy on one of them, every region waits
for the thread that is not running, a scheduler time slice at a time: a step takes 6-8x as
long, where one thread would take 2x (issue 14: 16 tokens took 25-34 s with 2 threads, 4 s
with 1, at load 6-11). So between steps, at most once per ``interval`` seconds, the governor
looks at how much CPU the rest of the machine used on this process's cores since its last look
(``/proc/stat`` per CPU, minus this process's own time) and runs on the cores left over: at
least one thread, at most the count it started with. It lowers the count at once and raises
it only after ``raise_after`` looks in a row agree, since too many threads cost far more than
too few. Only where the thread count is the engine's own choice (no ``--num-threads``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("pagedserve.engine")


@dataclass(frozen=True, slots=True)
class CpuSample:
    busy_s: float  # CPU seconds the cores of this process's affinity set have been busy
    own_s: float  # CPU seconds this process has used (every thread)


def affinity_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def read_sample(cores: list[int], stat: str = "/proc/stat") -> CpuSample | None:
    """Busy time of ``cores`` (user, nice, system, irq, softirq, steal; not idle or iowait)
    and this process's own CPU time; None where /proc/stat cannot be read (not Linux)."""
    want = {f"cpu{c}" for c in cores}
    busy = 0
    try:
        with open(stat) as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in want:
                    v = [int(x) for x in parts[1:9]]
                    busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    except (OSError, ValueError, IndexError):
        return None
    t = os.times()
    return CpuSample(busy / os.sysconf("SC_CLK_TCK"), t.user + t.system)


class ThreadGovernor:
    def __init__(
        self,
        max_threads: int,
        num_cores: int,
        set_threads: Callable[[int], None],
        read: Callable[[], CpuSample | None],
        interval: float = 1.0,
        raise_after: int = 3,
    ) -> None:
        self.max_threads, self.num_cores = max_threads, num_cores
        self.set_threads, self.read = set_threads, read
        self.interval, self.raise_after = interval, raise_after
        self.threads = max_threads
        self._last: tuple[float, CpuSample] | None = None
        self._higher = 0  # looks in a row that found room for more threads

    def tick(self, now: float | None = None) -> int:
        """Called between steps; returns the thread count to run with (changed if needed)."""
        now = time.monotonic() if now is None else now
        if self._last is not None and now - self._last[0] < self.interval:
            return self.threads
        sample = self.read()
        if sample is None:
            return self.threads
        last, self._last = self._last, (now, sample)
        if last is None:
            return self.threads
        dt = now - last[0]
        other = max(0.0, (sample.busy_s - last[1].busy_s) - (sample.own_s - last[1].own_s)) / dt
        # A thread goes once other work takes more than 0.7 of a core: the gateway and the
        # tokenizer workers of a busy server take some too, and a share that small leaves the
        # threads running most of the time.
        target = max(1, min(self.max_threads, int(self.num_cores - other + 0.7)))
        if target < self.threads:
            self._apply(target, other)
        elif target > self.threads:
            self._higher += 1
            if self._higher >= self.raise_after:
                self._apply(target, other)
        else:
            self._higher = 0
        return self.threads

    def _apply(self, threads: int, other: float) -> None:
        log.info(
            "other work is using %.1f of %d cores: %d engine thread(s) (up to %d)",
            other,
            self.num_cores,
            threads,
            self.max_threads,
        )
        self.set_threads(threads)
        self.threads, self._higher = threads, 0
