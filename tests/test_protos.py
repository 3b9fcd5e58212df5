"""The committed generated code is exactly what scripts/gen_protos.sh makes from the .proto
files (so nobody edits it by hand or forgets to regenerate)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh(tmp_path):
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen_protos.sh"), str(tmp_path)],
        cwd=REPO, env=env, check=True,
    )  # fmt: skip
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*_pb2*.py*")}
    committed = {p.relative_to(REPO): p.read_bytes() for p in (REPO / "protos").rglob("*_pb2*.py*")}
    assert fresh, "gen_protos.sh produced nothing"
    assert sorted(fresh) == sorted(committed)
    stale = [str(p) for p in fresh if fresh[p] != committed[p]]
    assert stale == [], f"regenerate with scripts/gen_protos.sh: {stale}"


def test_public_api_has_every_rpc():
    from protos.pagedserve.v1 import inference_pb2 as pb

    svc = pb.DESCRIPTOR.services_by_name["Inference"]
    assert sorted(m.name for m in svc.methods) == sorted(
        ["Generate", "Chat", "Tokenize", "Detokenize", "ListModels", "GetModelInfo", "Abort"]
    )
    assert svc.methods_by_name["Generate"].server_streaming
    assert svc.methods_by_name["Chat"].server_streaming
