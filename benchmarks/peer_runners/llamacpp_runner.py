"""llama.cpp's ``llama-server`` as a peer: a local server, one slot per request, run with any python.

Options (benchmarks/peers.py fills them in): ``server`` (the llama-server binary), ``gguf`` (the
model file), ``quant`` (f32, bf16 or q4_1: what the GGUF holds). The KV cache is f32 for an f32
GGUF, bf16 for a bf16 one and llama.cpp's default f16 for a quantized one. Every request goes
to ``/completion`` at once from its own thread (prompt as token ids, greedy, ``ignore_eos``,
``n_predict`` tokens, no prompt cache). Standard library only. See runner_common.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from runner_common import WARMUP_OUTPUT, WARMUP_PROMPTS, Job, log, run

KV_TYPES = {"f32": "f32", "bf16": "bf16", "q4_1": "f16"}
PRECISION = {
    "f32": "float32",
    "bf16": "bfloat16",
    "q4_1": "q4_1 weights, f16 KV cache",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCpp:
    def __init__(self, job: Job) -> None:
        opts = job.options
        quant = opts["quant"]
        n_slots = min(job.max_num_seqs, max(len(w["prompts"]) for w in job.workloads))
        longest = max(
            [len(p) + n for w in job.workloads for p, n in zip(w["prompts"], w["output_lens"])]
            + [len(p) + WARMUP_OUTPUT for p in WARMUP_PROMPTS]
        )
        per_slot = -(-(longest + 16) // 256) * 256  # a little headroom, whole 256s
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            opts["server"],
            "-m", opts["gguf"],
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "-t", str(job.threads),
            "-tb", str(job.threads),
            "-np", str(n_slots),
            "-c", str(per_slot * n_slots),
            "-b", str(job.max_num_batched_tokens),
            "-ctk", KV_TYPES[quant],
            "-ctv", KV_TYPES[quant],
            "--cont-batching",
            "-cram", "0",  # no host-memory prompt cache (saving idle slots costs CPU)
            "--no-webui",
        ]  # fmt: skip
        cmd += opts.get("extra_args", [])
        self._log = tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log")
        log(" ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout=300)
        out = subprocess.run([opts["server"], "--version"], capture_output=True, text=True)
        lines = (out.stdout + out.stderr).splitlines()
        build = next((ln.split(":", 1)[1].strip() for ln in lines if "version:" in ln), "?")
        self.version = f"llama.cpp {build}" + _sdist_hint(opts["server"])
        self.precision = PRECISION[quant]
        self.details = (
            f"{os.path.basename(opts['gguf'])}, -t {job.threads}, -np {n_slots} slots of "
            f"{per_slot} tokens, KV {KV_TYPES[quant]}, -b {job.max_num_batched_tokens}, "
            f"continuous batching, no prompt cache"
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.proc.returncode}: {self._tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"llama-server not ready in {timeout} s: {self._tail()}")

    def _tail(self) -> str:
        self._log.flush()
        with open(self._log.name) as fh:
            return " | ".join(fh.read().splitlines()[-15:])

    def _complete(self, prompt: Sequence[int], n: int) -> list[int]:
        body = {
            "prompt": list(prompt),
            "n_predict": n,
            "ignore_eos": True,
            "temperature": 0.0,  # greedy
            "top_k": 1,
            "cache_prompt": False,
            "return_tokens": True,
            "stream": False,
        }
        req = urllib.request.Request(
            self.url + "/completion",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=3600) as r:
            reply = json.load(r)
        tokens = reply.get("tokens")
        if not tokens and reply.get("tokens_predicted"):  # a server without return_tokens
            tokens = [-1] * reply["tokens_predicted"]
        return list(tokens or [])

    def generate(
        self, prompts: Sequence[Sequence[int]], output_lens: Sequence[int]
    ) -> list[list[int]]:
        outs: list[list[int] | BaseException] = [[] for _ in prompts]

        def one(i: int) -> None:
            try:
                outs[i] = self._complete(prompts[i], output_lens[i])
            except BaseException as e:  # reported below, in the caller's thread
                outs[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for o in outs:
            if isinstance(o, BaseException):
                raise RuntimeError(f"llama-server request failed: {o}; {self._tail()}") from o
        return outs  # type: ignore[return-value]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _sdist_hint(server: str) -> str:
    """Which llama-cpp-python sdist vendored the build, when its source sits next to it."""
    base = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(server))))
    src = os.path.join(base, "llamacpp-src")
    names = (
        sorted(n for n in os.listdir(src) if not n.endswith(".tar.gz"))
        if os.path.isdir(src)
        else []
    )
    return f", vendored by {names[-1].replace('_', '-')}" if names else ""


if __name__ == "__main__":
    raise SystemExit(run(LlamaCpp))
