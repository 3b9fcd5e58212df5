"""compose.yaml, Dockerfile and .dockerignore, checked without a Docker engine.

The structural checks always run: every command a container runs parses with the real
`pagedserve` argument parser, the ZeroMQ addresses line up between the services, the model
cache volume sits at the same path in the engine and the tokenizer workers, the GPU engine
reserves a GPU, each profile starts exactly one engine. `docker-compose config` (Debian's
1.29.2, `apt-get install docker-compose`) and `docker compose config` (v2 plugin) validate the
file against the Compose schema where they are installed and skip with a reason otherwise.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from pagedserve.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
PROFILES = ("gpu", "cpu")
ENGINES = {"gpu": "engine", "cpu": "engine-cpu"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def _parse(argv) -> object:
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), (
        f"commands must be exec-form lists of strings, got {argv!r}"
    )
    return build_parser().parse_args(argv)


def _hostport(address: str) -> tuple[str, int]:
    u = urlsplit(address)
    assert u.scheme == "tcp", f"{address}: containers talk over tcp://"
    return u.hostname, u.port


def _active(services: dict, profile: str | None) -> set[str]:
    """The services `COMPOSE_PROFILES=<profile> docker compose up` starts."""
    return {name for name, s in services.items() if "profiles" not in s or profile in s["profiles"]}


def _hostnames(service_name: str, service: dict) -> set[str]:
    names = {service_name}
    for net in (service.get("networks") or {}).values():
        names.update((net or {}).get("aliases", []))
    return names


def _seconds(duration: str) -> float:
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def _dockerfile_env(dockerfile) -> dict[str, str]:
    env = {}
    for ins, args in dockerfile:
        if ins == "ENV":
            env.update(dict(kv.split("=", 1) for kv in args.split()))
    return env


# -- services and profiles ---------------------------------------------------------------------
def test_each_profile_runs_one_engine_the_tokenizers_and_the_gateway(services):
    assert set(services) == {"engine", "engine-cpu", "tokenizer", "gateway"}
    for profile, engine in ENGINES.items():
        active = _active(services, profile)
        assert active == {engine, "tokenizer", "gateway"}, profile
        # exactly one active service answers to the name the tokenizer workers connect to
        answering = [n for n in active if "engine" in _hostnames(n, services[n])]
        assert answering == [engine], profile
    # with no profile nothing starts (rather than a gateway that never becomes ready)
    assert _active(services, None) == set()


def test_commands_parse_with_the_real_cli(services):
    expected = {"engine": "engine", "engine-cpu": "engine", "tokenizer": "tokenizer"}
    for name, s in services.items():
        ns = _parse(s["command"])
        assert ns.command == expected.get(name, name), name
        hc = s.get("healthcheck")
        if hc:
            assert hc["test"][:2] == ["CMD", "pagedserve"], name
            assert _parse(hc["test"][2:]).command == "health", name


def test_addresses_line_up(services):
    eng = {}
    for profile, name in ENGINES.items():
        ns = _parse(services[name]["command"])
        host, eng[profile] = _hostport(ns.listen)
        assert host == "0.0.0.0", f"{name} must listen on all interfaces, not {host}"
        # the health check asks this engine, on the port it listens on
        hc = _parse(services[name]["healthcheck"]["test"][2:])
        assert _hostport(hc.engine) == ("127.0.0.1", eng[profile])
    assert len(set(eng.values())) == 1, "both engines listen on the same port"

    tok = _parse(services["tokenizer"]["command"])
    gw = _parse(services["gateway"]["command"])
    assert [_hostport(e) for e in tok.engine] == [("engine", eng["gpu"])]
    gw_host, gw_port = _hostport(gw.listen)
    assert gw_host == "0.0.0.0"
    assert _hostport(tok.gateway) == ("gateway", gw_port)
    assert "gateway" in _hostnames("gateway", services["gateway"])
    assert tok.tokenizer is None, "workers load the tokenizer from the path the engine reports"
    assert tok.tokenizer_workers == gw.expect_workers >= 1

    # the gRPC, HTTP and metrics servers listen on all interfaces, on the published ports
    assert gw.host == "0.0.0.0" and gw.metrics_host == "0.0.0.0"
    published = {}
    for p in services["gateway"]["ports"]:
        host_port, _, container_port = str(p).rpartition(":")
        published[int(container_port)] = int(host_port)
    assert published == {
        gw.port: gw.port,
        gw.metrics_port: gw.metrics_port,
        gw.http_port: gw.http_port,
    }
    assert gw.port == 50051 and gw.http_port == 8000
    hc = _parse(services["gateway"]["healthcheck"]["test"][2:])
    assert hc.target == f"127.0.0.1:{gw.port}"
    # nothing but the gateway is reachable from outside
    assert [n for n, s in services.items() if s.get("ports")] == ["gateway"]


def test_model_cache_volume_is_shared_at_the_same_path(compose, services, dockerfile):
    assert list(compose["volumes"]) == ["models", "kernels"]
    mounts = {}
    for name in ("engine", "engine-cpu", "tokenizer"):
        spec = [v for v in services[name]["volumes"] if v.startswith("models:")]
        assert len(spec) == 1, name
        source, target, *mode = spec[0].split(":")
        assert source == "models", name
        mounts[name] = (target, mode)
    targets = {t for t, _ in mounts.values()}
    assert len(targets) == 1, (
        f"the model path the engine reports must exist in the workers: {mounts}"
    )
    (target,) = targets
    assert mounts["engine"][1] == mounts["engine-cpu"][1] == [], "engines write the cache"
    assert _dockerfile_env(dockerfile)["PAGEDSERVE_HOME"] == target
    # the non-root user owns the directory, so a fresh named volume is writable by it
    runs = " ".join(a for i, a in dockerfile if i == "RUN")
    assert f"mkdir {target}" in runs and re.search(rf"chown \S+ {re.escape(target)}\b", runs)
    assert "volumes" not in services["gateway"]


def test_engines_keep_their_kernel_builds_in_a_volume(services, dockerfile):
    """The torch extension cache the image builds the CPU kernels into is a named volume on
    the engines, so a build made at start (another CPU than the image's) survives recreation;
    the user owns the directory, so the fresh volume is writable."""
    where = _dockerfile_env(dockerfile)["TORCH_EXTENSIONS_DIR"]
    for name in ("engine", "engine-cpu"):
        assert f"kernels:{where}" in services[name]["volumes"], name
    runs = " ".join(a for i, a in dockerfile if i == "RUN")
    assert "pagedserve build-kernels" in runs
    assert re.search(r"chown -R \S+ \"?\$TORCH_EXTENSIONS_DIR", runs)
    assert "kernels:" not in str(services["tokenizer"].get("volumes"))


def test_gpu_engine_reserves_a_gpu_and_is_built_with_cuda_torch(services):
    (device,) = services["engine"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert "gpu" in device["capabilities"]
    for name, s in services.items():
        variant = s["build"]["args"]["TORCH_VARIANT"]
        assert variant == ("cuda" if name == "engine" else "cpu"), name
        assert s["image"] == f"pagedserve:{variant}", name
        if name != "engine":
            assert "deploy" not in s, f"{name} must run without a GPU"


def test_healthchecks_and_restart_policy(services):
    health_timeout = build_parser().parse_args(["health"]).timeout
    for name, s in services.items():
        assert s["restart"] in ("unless-stopped", "always", "on-failure"), name
    for name in ("engine", "engine-cpu", "gateway"):
        hc = services[name]["healthcheck"]
        # the first start downloads and converts the default model
        assert _seconds(hc["start_period"]) >= 600, name
        assert _seconds(hc["timeout"]) > health_timeout, name
        assert _seconds(hc["interval"]) >= 5 and hc["retries"] >= 1, name


# -- Dockerfile and build context --------------------------------------------------------------
def test_dockerfile(dockerfile):
    ins = [i for i, _ in dockerfile]
    assert dockerfile[0] == ("FROM", "python:3.11-slim")
    runs = [(k, a) for k, (i, a) in enumerate(dockerfile) if i == "RUN"]
    torch_at = [k for k, a in runs if "pip install" in a and "torch==" in a]
    install_at = [k for k, a in runs if re.search(r"pip install /src\b", a)]
    assert torch_at and install_at and max(torch_at) < min(install_at), "torch before the project"
    (torch_run,) = [a for k, a in runs if k in torch_at]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_run
    assert 'cuda) pip install "torch==${TORCH_VERSION}" ;;' in torch_run
    args = dict(a.split("=", 1) for i, a in dockerfile if i == "ARG")
    assert args["TORCH_VARIANT"] == "cpu" and args["TORCH_VERSION"] == "2.13.0"
    exposed = {int(p) for i, a in dockerfile if i == "EXPOSE" for p in a.split()}
    assert {50051, 9400} <= exposed
    (user,) = [a for i, a in dockerfile if i == "USER"]
    assert user not in ("root", "0")
    assert ins.index("USER") > max(k for k, i in enumerate(ins) if i == "RUN")
    (entry,) = [json.loads(a) for i, a in dockerfile if i == "ENTRYPOINT"]
    assert entry == ["pagedserve"], "compose commands are the CLI's arguments"
    (cmd,) = [json.loads(a) for i, a in dockerfile if i == "CMD"]
    ns = _parse(cmd)
    assert ns.command == "up" and ns.host == "0.0.0.0"


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore matching, for the plain patterns this repository uses."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    for pat in patterns:
        if pat.startswith("**/"):
            if any(fnmatch.fnmatchcase(p, pat[3:]) for p in parts):
                return True
        elif any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            return True
    return False


def test_build_context_installs_and_runs(tmp_path):
    """What `COPY . /src && pip install /src` gets: the files .dockerignore lets through."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip().rstrip("/") for p in lines if p.strip() and not p.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "negations are not modelled here"
    assert {".git", ".venv"} <= set(patterns)
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    ctx = tmp_path / "src"
    for rel in tracked:
        if not _dockerignored(rel, patterns) and (ROOT / rel).is_file():
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, ctx / rel)
    assert (ctx / "pyproject.toml").is_file() and not (ctx / "tests").exists()

    site = tmp_path / "site"
    # build offline with the venv's setuptools where it has one (the image's pip fetches it)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation]
        + ["--target", str(site), str(ctx)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (site / "bin" / "pagedserve").is_file()
    # run the installed copy from elsewhere, so nothing comes from the working tree
    env = {**os.environ, "PYTHONPATH": str(site)}
    for sub in ("engine", "tokenizer", "gateway", "health"):
        r = subprocess.run(
            [sys.executable, "-m", "pagedserve.cli", sub, "--help"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
    probe = "import pagedserve, protos; print(pagedserve.__file__, protos.__file__)"
    r = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.count(str(site)) == 2, r.stdout + r.stderr


# -- the Compose schema, where a compose implementation is installed ----------------------------
def _compose_cli(kind: str) -> list[str]:
    if kind == "docker-compose":
        exe = shutil.which("docker-compose")
        if exe is None:
            pytest.skip("docker-compose not installed (Debian: apt-get install -y docker-compose)")
        return [exe]
    exe = shutil.which("docker")
    if exe is None or subprocess.run([exe, "compose", "version"], capture_output=True).returncode:
        pytest.skip("the docker compose v2 plugin is not installed")
    return [exe, "compose"]


@pytest.mark.parametrize("profile", [None, *PROFILES])
@pytest.mark.parametrize("kind", ["docker-compose", "docker compose"])
def test_compose_config_validates(kind, profile, services):
    cli = _compose_cli(kind)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    args = ["-f", str(COMPOSE)] + (["--profile", profile] if profile else []) + ["config"]
    r = subprocess.run(cli + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    resolved = (yaml.safe_load(r.stdout) or {}).get("services") or {}
    if kind == "docker compose":  # v2 leaves out the services of inactive profiles
        assert set(resolved) == _active(services, profile)
    else:  # 1.29.2 shows every service whatever the profile
        assert set(resolved) == set(services)
    for name, s in resolved.items():
        assert s["command"] == services[name]["command"], name
