"""Run pagedserve's processes as supervised children: they die with their parent (no orphans),
a child that dies is restarted with backoff, and stop() ends them all (TERM, then KILL)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("pagedserve")

_PR_SET_PDEATHSIG = 1
HEALTHY_S = 60.0  # a child up this long has its restart count reset


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: stop() still ends the children on a clean exit


@dataclass
class Child:
    name: str
    argv: list[str]
    restart: bool = True
    env: dict[str, str] | None = None  # None: the supervisor's environment
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        # Own session: a Ctrl-C reaches only the supervisor, which then stops the children in
        # order (gateway first) instead of every process racing to exit.
        self.proc = subprocess.Popen(
            self.argv,
            start_new_session=True,
            env=self.env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    def __init__(self, children: list[Child], max_restarts: int = 5) -> None:
        self.children = children
        self.max_restarts = max_restarts

    def start(self) -> None:
        for c in self.children:
            c.start()

    def check(self) -> str | None:
        """Restart dead children; returns a reason to give up, or None."""
        now = time.monotonic()
        for c in self.children:
            if c.proc is None:
                continue
            if c.alive:
                if c.restarts and now - c.started_at > HEALTHY_S:
                    c.restarts = 0  # a crash weeks later is not the 6th in a row
                continue
            if c.next_start == 0.0:
                code = c.proc.returncode
                # Exit code 2 is a usage or configuration error: restarting cannot fix it.
                if not c.restart or code == 2 or c.restarts >= self.max_restarts:
                    return f"{c.name} exited with code {code}"
                c.restarts += 1
                c.next_start = now + min(2.0**c.restarts, 30.0)
                log.warning("%s exited with code %s; restarting (%d)", c.name, code, c.restarts)
            elif now >= c.next_start:
                c.next_start = 0.0
                c.start()
        return None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop in reverse start order (the gateway first, so it drains its streams while the
        engine still answers), each with up to ``timeout`` seconds before SIGKILL."""
        for c in reversed(self.children):
            if not c.alive:
                continue
            c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time: killing it", c.name)
                c.proc.kill()
                c.proc.wait()
            # Its own processes (a model download, a kernel build) are in its session: they go
            # with it rather than live on as orphans.
            _kill_group(c.proc.pid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left
        pass


def python_argv(*args: str) -> list[str]:
    """Run ``pagedserve <args>`` with this interpreter, whatever is on PATH."""
    return [sys.executable, "-m", "pagedserve.cli", *args]
