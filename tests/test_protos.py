"""The committed generated code is exactly what scripts/gen_protos.sh makes from the .proto
files (so nobody edits it by hand or forgets to regenerate)."""

from __future__ import annotations

import re
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


def test_sampling_fields_map_onto_the_dataclass_once():
    """The public fields -> SamplingParams mapping both fronts use: unset max_tokens stays
    unset (the server's default applies later), the dataclass's own checks apply, and what it
    cannot know (vocabulary, the client's share of stop ids, an unknown field) is refused here
    with InvalidRequestError, never a TypeError (which would reach a client as INTERNAL)."""
    import pytest

    from protos.errors import InvalidRequestError
    from protos.requests import sampling_params

    sp = sampling_params({"temperature": 0.5, "stop": ["x"]}, vocab_size=100)
    assert (sp.max_tokens, sp.temperature, sp.stop, sp.top_p) == (None, 0.5, ["x"], 1.0)
    bad = [
        ({"temprature": 1.0}, "unknown sampling fields: temprature"),
        ({"max_tokens": 0}, "leave it unset for the default"),
        ({"top_k": -5}, "top_k must be -1, 0 (off) or >= 1, got -5"),
        ({"stop_token_ids": list(range(65))}, "at most 64 stop_token_ids, got 65"),
        ({"logit_bias": {100: 1.0}}, "out of the vocabulary (size 100): [100]"),
    ]
    for fields, message in bad:
        with pytest.raises(InvalidRequestError, match=re.escape(message)):
            sampling_params(fields, vocab_size=100)
