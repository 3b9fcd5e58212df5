"""The CPU engine's thread governor (engine_svc.threads): fewer threads while other work takes
the cores, back up when it stops."""

from __future__ import annotations

import subprocess
import sys
import time

from engine_svc.threads import CpuSample, ThreadGovernor, affinity_cores, read_sample


class Samples:
    """A scripted machine: each look advances 1 s, in which this process used ``own`` CPU
    seconds and the machine ``own + other``."""

    def __init__(self) -> None:
        self.busy = self.own = 0.0
        self.plan: list[tuple[float, float]] = []

    def __call__(self) -> CpuSample:
        own, other = self.plan.pop(0) if self.plan else (0.0, 0.0)
        self.busy += own + other
        self.own += own
        return CpuSample(self.busy, self.own)


def governor(samples: Samples, max_threads: int = 2, cores: int = 2):
    applied: list[int] = []
    g = ThreadGovernor(max_threads, cores, applied.append, samples, interval=1.0, raise_after=3)
    return g, applied


def test_lowers_at_once_and_raises_after_three_quiet_looks() -> None:
    s = Samples()
    g, applied = governor(s)
    s.plan = [(0, 0), (1.9, 0.1), (1.0, 1.0), (1.0, 1.0), (1.5, 0.0), (1.5, 0.0), (1.5, 0.0)]
    got = [g.tick(now=float(t)) for t in range(7)]
    # first look: a baseline; 0.1 core of other work: keep 2; a whole core: 1 at once;
    # the machine quiet again: 2 after the third quiet look
    assert got == [2, 2, 1, 1, 1, 1, 2]
    assert applied == [1, 2]


def test_looks_at_most_once_per_interval() -> None:
    s = Samples()
    g, applied = governor(s)
    s.plan = [(0, 0), (0.5, 1.5)]
    assert g.tick(now=0.0) == 2
    assert g.tick(now=0.5) == 2 and len(s.plan) == 1  # too soon: /proc/stat not read
    assert g.tick(now=1.0) == 1 and applied == [1]


def test_small_shares_keep_every_thread_and_a_noisy_look_does_not_raise() -> None:
    s = Samples()
    g, applied = governor(s, max_threads=4, cores=4)
    # 0.6 of a core elsewhere (a busy gateway) keeps 4; 1.8 cores -> 2; one quiet look
    # between busy ones does not raise
    s.plan = [(0, 0), (3.4, 0.6), (2.2, 1.8), (3.9, 0.1), (2.2, 1.8), (3.9, 0.1)]
    got = [g.tick(now=float(t)) for t in range(6)]
    assert got == [4, 4, 2, 2, 2, 2]
    assert applied == [2]


def test_never_below_one_thread_nor_above_the_start() -> None:
    s = Samples()
    g, applied = governor(s, max_threads=2, cores=8)
    s.plan = [(0, 0), (1.0, 7.9)] + [(2.0, 0.0)] * 5
    got = [g.tick(now=float(t)) for t in range(7)]
    assert got == [2, 1, 1, 1, 2, 2, 2]  # 8 idle cores, but it started with 2
    assert applied == [1, 2]


def test_no_proc_stat_keeps_the_threads(tmp_path) -> None:
    assert read_sample([0], str(tmp_path / "missing")) is None
    g, applied = governor(lambda: None)
    assert [g.tick(now=float(t)) for t in range(3)] == [2, 2, 2] and applied == []


def test_read_sample_sums_the_busy_fields_of_the_given_cores(tmp_path) -> None:
    import os

    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  900 0 900 900 0 0 0 0 0 0\n"
        # user nice system idle iowait irq softirq steal guest guest_nice
        "cpu0 100 10 20 5000 70 1 2 3 0 0\n"
        "cpu1 200 0 0 100 0 0 0 0 0 0\n"
        "cpu2 400 0 0 100 0 0 0 0 0 0\n"
        "intr 12345\n"
    )
    got = read_sample([0, 2], str(stat))
    hz = os.sysconf("SC_CLK_TCK")
    assert got is not None and abs(got.busy_s - (136 + 400) / hz) < 1e-9


def test_real_busy_processes_on_every_core_leave_one_thread() -> None:
    """/proc/stat for real: as many busy processes as this process has cores, so other work
    takes nearly all of them; the governor (as if started with one more thread than there
    are cores) drops to one thread."""
    cores = affinity_cores()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(len(cores))]
    try:
        applied: list[int] = []
        g = ThreadGovernor(
            len(cores) + 1, len(cores), applied.append, lambda: read_sample(cores), interval=0.5
        )
        g.tick()
        time.sleep(1.5)
        assert g.tick() == 1 and applied == [1]
    finally:
        for h in hogs:
            h.kill()
            h.wait()
