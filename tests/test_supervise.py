"""Process supervision (``pagedserve.supervise``) with small shell children, no model."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from pagedserve.supervise import Child, Supervisor


def test_stop_takes_a_childs_own_processes_with_it():
    """A part's own subprocess (a model download, a kernel build) sits in its session: when
    the supervisor stops the part, that process goes too instead of living on as an orphan."""
    child = Child("shell", ["sh", "-c", "sleep 29 & wait"], restart=False)
    sup = Supervisor([child])
    sup.start()
    pgid = child.proc.pid
    end = time.monotonic() + 10
    while True:  # until the shell has started its sleep
        ps = subprocess.run(["ps", "-o", "pid=", "-g", str(pgid)], capture_output=True, text=True)
        if len(ps.stdout.split()) >= 2:
            break
        assert time.monotonic() < end, ps.stdout
        time.sleep(0.05)
    sup.stop(timeout=5)
    time.sleep(0.2)
    ps = subprocess.run(["ps", "-o", "stat=,pid=,comm=", "-g", str(pgid)], capture_output=True,
                        text=True)  # fmt: skip
    # a killed orphan may stay a zombie where PID 1 does not reap (this container): it is dead
    live = [line for line in ps.stdout.splitlines() if not line.strip().startswith("Z")]
    assert live == [], f"left behind: {live}"


def test_a_closed_terminal_stops_a_part_cleanly():
    """SIGHUP (the terminal closed) runs the same clean stop as SIGTERM and Ctrl-C."""
    code = (
        "import os, signal, sys, time\n"
        "from pagedserve import serve\n"
        "serve._on_term(lambda: sys.exit(7))\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "time.sleep(5)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd(), timeout=30)
    assert r.returncode == 7
