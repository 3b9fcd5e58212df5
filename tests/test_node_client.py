"""End-to-end in a second language: a Node.js client (``@grpc/grpc-js`` + ``@grpc/proto-loader``
from npm, loading protos/pagedserve/v1/inference.proto at run time) streams Generate from a
real ``pagedserve up`` stack. See tests/node_client/client.js for the client's output format."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from tests.serving_stack import collect, pb, start_stack, stop_stack, stub

NODE_DIR = Path(__file__).resolve().parent / "node_client"
NPM_TIMEOUT = 300
GREEDY = {"text": "The capital of France is", "max_tokens": 16, "temperature": 0}


@pytest.fixture(scope="module")
def node_client() -> Path:
    """tests/node_client with its npm dependencies installed (``npm ci`` from the lock file)."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found on PATH: the Node.js client test needs them"
        )
    deps = [NODE_DIR / "node_modules" / "@grpc" / name for name in ("grpc-js", "proto-loader")]
    deps.append(NODE_DIR / "node_modules" / "openai")
    if not all(d.is_dir() for d in deps):
        cmd = ["npm", "ci" if (NODE_DIR / "package-lock.json").exists() else "install"]
        cmd += ["--no-audit", "--no-fund"]
        try:
            r = subprocess.run(
                cmd, cwd=NODE_DIR, capture_output=True, text=True, timeout=NPM_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(cmd)}` in {NODE_DIR} took over {NPM_TIMEOUT}s")
        if r.returncode != 0:
            pytest.fail(f"`{' '.join(cmd)}` in {NODE_DIR} failed:\n{r.stdout}\n{r.stderr}")
    return NODE_DIR


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("stack"))
    yield s
    code = stop_stack(s)
    assert code == 0, s.log()
    assert s.processes() == [], "processes left behind after Ctrl-C"


def run_node(node_dir: Path, target: str, api_key: str, request: dict) -> dict:
    """Run client.js; return {"messages": [...], "status": {...}, "rc": int, "stderr": str}."""
    r = subprocess.run(
        ["node", str(node_dir / "client.js"), target, api_key, json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=150,
    )
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert lines and "status" in lines[-1], f"no status line:\n{r.stdout}\n{r.stderr}"
    assert all("message" in line for line in lines[:-1]), r.stdout
    return {
        "messages": [line["message"] for line in lines[:-1]],
        "status": lines[-1]["status"],
        "rc": r.returncode,
        "stderr": r.stderr,
    }


def test_node_greedy_generate_streams_deltas_then_final_like_python(node_client, stack):
    out = run_node(node_client, stack.target, stack.api_key, GREEDY)
    assert out["rc"] == 0, out
    assert out["status"]["name"] == "OK"

    msgs = out["messages"]
    assert {m["index"] for m in msgs} == {0}
    kinds = [m["kind"] for m in msgs]
    assert kinds[-1] == "final" and kinds.count("final") == 1, kinds
    deltas = [m["delta"] for m in msgs[:-1]]
    assert len(deltas) >= 2
    text = "".join(d["text"] for d in deltas)
    token_ids = [t for d in deltas for t in d["token_ids"]]

    final = msgs[-1]["final"]
    assert final["finish_reason"] in ("LENGTH", "STOP")
    assert final["usage"]["completion_tokens"] == len(token_ids) <= GREEDY["max_tokens"]
    assert final["usage"]["prompt_tokens"] > 0

    # Greedy is deterministic: the Python client gets the same stream for the same request.
    with grpc.insecure_channel(stack.target) as ch:
        responses = stub(ch).Generate(
            pb.GenerateRequest(**GREEDY), metadata=stack.auth, timeout=120
        )
        ref = collect(responses)[0]
    assert text == ref["text"]
    assert token_ids == ref["token_ids"]
    assert final["finish_reason"] == pb.FinishReason.Name(ref["final"].finish_reason)


def test_node_invalid_request_gets_invalid_argument(node_client, stack):
    out = run_node(node_client, stack.target, stack.api_key, {**GREEDY, "temperature": -1})
    assert out["rc"] != 0
    assert out["messages"] == []
    assert out["status"]["name"] == "INVALID_ARGUMENT", out
    assert "temperature" in out["status"]["details"]
    assert "INVALID_ARGUMENT" in out["stderr"]


@pytest.mark.parametrize(("api_key", "detail"), [("", "missing"), ("wrong-key", "invalid")])
def test_node_bad_api_key_gets_unauthenticated(node_client, stack, api_key, detail):
    out = run_node(node_client, stack.target, api_key, GREEDY)
    assert out["rc"] != 0
    assert out["messages"] == []
    assert out["status"]["name"] == "UNAUTHENTICATED", out
    assert detail in out["status"]["details"]
    assert "UNAUTHENTICATED" in out["stderr"]
