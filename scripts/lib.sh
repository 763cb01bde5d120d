# shellcheck shell=bash
# Shared helpers for the mos scripts: sourced, never run.
#
# mos_libtorch_env: makes sure a libtorch 2.11.0 is available and exports
# LIBTORCH (and LIBTORCH_LIB) for the tch build. Order of preference:
#   1. LIBTORCH set by the user (their own libtorch 2.11.0, e.g. a CUDA build);
#   2. PyPI torch==2.11.0 installed once into a cache shared by every clone:
#      ${MOS_TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/mos/torch-2.11.0}.
# A completed install is marked by the file .complete; a second call (or a
# fresh clone on the same machine) downloads nothing.

MOS_TORCH_VERSION=2.11.0

mos_log() { printf '[mos] %s\n' "$*" >&2; }

mos_torch_home() {
    printf '%s\n' "${MOS_TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/mos/torch-$MOS_TORCH_VERSION}"
}

mos_check_libtorch_dir() {
    local dir=$1
    if [ ! -f "$dir/lib/libtorch_cpu.so" ] || [ ! -d "$dir/include/torch" ]; then
        mos_log "error: $dir is not a libtorch directory (expected lib/libtorch_cpu.so and include/torch)"
        return 1
    fi
    # torch-sys checks build-version (libtorch zips) but not version.py (PyPI wheels).
    local version=""
    if [ -f "$dir/build-version" ]; then
        version=$(cat "$dir/build-version")
    elif [ -f "$dir/version.py" ]; then
        version=$(sed -n "s/^__version__ = '\(.*\)'$/\1/p" "$dir/version.py")
    fi
    case "$version" in
        "$MOS_TORCH_VERSION" | "$MOS_TORCH_VERSION"+*) ;;
        "") mos_log "warning: cannot tell the libtorch version of $dir (mos needs $MOS_TORCH_VERSION)" ;;
        *)
            mos_log "error: $dir is libtorch $version; mos (tch 0.24) needs $MOS_TORCH_VERSION"
            return 1
            ;;
    esac
}

mos_install_torch() {
    local home=$1
    local python=${PYTHON:-python3}
    if ! command -v "$python" >/dev/null 2>&1; then
        mos_log "error: $python not found; install Python 3 with pip, or set LIBTORCH to a libtorch $MOS_TORCH_VERSION"
        return 1
    fi
    mkdir -p "$(dirname "$home")"
    local partial="$home.partial.$$"
    rm -rf "$partial"
    mos_log "installing PyPI torch==$MOS_TORCH_VERSION into $home (once per machine; about 5 GB)"
    if ! "$python" -m pip install --disable-pip-version-check --no-cache-dir --quiet \
        --target "$partial/site" "torch==$MOS_TORCH_VERSION"; then
        rm -rf "$partial"
        mos_log "error: pip install torch==$MOS_TORCH_VERSION failed"
        return 1
    fi
    touch "$partial/.complete"
    rm -rf "$home"
    mv "$partial" "$home"
}

# Installs the system build tools (cmake, nasm) if they are missing.
mos_system_deps() {
    bash "$(dirname "${BASH_SOURCE[0]}")/system-deps.sh"
}

mos_libtorch_env() {
    if [ -n "${LIBTORCH:-}" ]; then
        mos_check_libtorch_dir "$LIBTORCH" || return 1
        mos_log "using LIBTORCH=$LIBTORCH (set by the user)"
    else
        local home
        home=$(mos_torch_home)
        if [ ! -f "$home/.complete" ]; then
            mkdir -p "$(dirname "$home")"
            # One installer at a time per cache; the others wait and then reuse it.
            exec 9>"$home.lock"
            flock 9
            if [ ! -f "$home/.complete" ]; then
                mos_install_torch "$home" || { flock -u 9; return 1; }
            fi
            flock -u 9
        fi
        LIBTORCH="$home/site/torch"
        mos_check_libtorch_dir "$LIBTORCH" || return 1
        export LIBTORCH
        # The CUDA wheel's c10d NCCL backend: build.rs compiles mos' NCCL shim only
        # with complete CUDA headers (docs/distributed.md#building-c10d-headers-gloo-and-nccl).
        if [ -f "$LIBTORCH/lib/libtorch_cuda.so" ] && [ -z "${MOS_CUDA_INCLUDE:-}" ]; then
            mos_cuda_headers "$(dirname "$home")/cuda-headers-13.0" || return 1
        fi
    fi
}

# mos_cuda_headers DIR: the CUDA runtime headers the torch wheel leaves out (crt/ from
# PyPI nvidia-cuda-crt, nv/target from nvidia-cuda-cccl; 13.0 as the wheel's CUDA),
# installed once into DIR; exports MOS_CUDA_INCLUDE for build.rs.
mos_cuda_headers() {
    local dir=$1
    if [ ! -f "$dir/.complete" ]; then
        exec 8>"$dir.lock"
        flock 8
        if [ ! -f "$dir/.complete" ]; then
            local partial="$dir.partial.$$"
            rm -rf "$partial"
            mos_log "installing PyPI nvidia-cuda-crt and nvidia-cuda-cccl 13.0 (headers for the NCCL backend, about 20 MB) into $dir"
            if ! "${PYTHON:-python3}" -m pip install --disable-pip-version-check --no-cache-dir --quiet --no-deps \
                --target "$partial" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*"; then
                rm -rf "$partial"
                flock -u 8
                mos_log "error: pip install nvidia-cuda-crt nvidia-cuda-cccl failed"
                return 1
            fi
            touch "$partial/.complete"
            rm -rf "$dir"
            mv "$partial" "$dir"
        fi
        flock -u 8
    fi
    export MOS_CUDA_INCLUDE="$dir/nvidia/cu13/include"
}

# The Python packages of the references (tests/fixtures/make_*.py) and of the
# benchmarks, pinned to the versions the committed fixtures were written with.
MOS_PY_REQUIREMENTS="numpy==2.4.6 scipy==1.17.1 scikit-learn==1.9.1 pillow==13.0.0 safetensors==0.8.0"
MOS_PY_NODEPS="torchvision==0.26.0"

# mos_python_env: makes sure a virtual environment with the reference packages
# and the setup cache's torch exists, and prints its python. It is created with
# `python3 -m venv` (nothing from the machine's own site-packages is used), sees
# torch through a .pth file, and is rebuilt when the pinned versions change.
# Needs mos_libtorch_env's torch install (not a user's LIBTORCH: torch's Python
# package is needed too). Override the location with MOS_PYENV.
mos_python_env() {
    local python=${PYTHON:-python3}
    local torch_site
    torch_site="$(mos_torch_home)/site"
    if [ ! -f "$torch_site/torch/__init__.py" ]; then
        mos_log "error: no torch Python package in $torch_site (run scripts/setup.sh without LIBTORCH once)"
        return 1
    fi
    local env=${MOS_PYENV:-$(dirname "$(mos_torch_home)")/pyenv}
    local stamp="$MOS_PY_REQUIREMENTS $MOS_PY_NODEPS $torch_site"
    if [ ! -f "$env/.complete" ] || [ "$(cat "$env/.complete")" != "$stamp" ]; then
        mkdir -p "$(dirname "$env")"
        exec 8>"$env.lock"
        flock 8
        if [ ! -f "$env/.complete" ] || [ "$(cat "$env/.complete")" != "$stamp" ]; then
            mos_log "creating the reference Python environment $env"
            rm -rf "$env"
            "$python" -m venv "$env" >&2 || { flock -u 8; return 1; }
            local pip=("$env/bin/python" -m pip install --disable-pip-version-check --no-cache-dir --quiet)
            # shellcheck disable=SC2086
            if ! "${pip[@]}" $MOS_PY_REQUIREMENTS >&2 || ! "${pip[@]}" --no-deps $MOS_PY_NODEPS >&2; then
                mos_log "error: pip could not install the reference packages into $env"
                flock -u 8
                return 1
            fi
            local site
            site=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
            printf '%s\n' "$torch_site" >"$site/mos-torch.pth"
            "$env/bin/python" -c 'import numpy, scipy, sklearn, PIL, safetensors, torch, torchvision' >&2 ||
                { mos_log "error: the reference environment $env does not import"; flock -u 8; return 1; }
            printf '%s' "$stamp" >"$env/.complete"
        fi
        flock -u 8
    fi
    printf '%s\n' "$env/bin/python"
}

# mos_kernel_check MOS_BINARY: prints which CPU kernels libtorch picks in the
# current environment, as "ATen CPU capability: X; oneDNN ISA: Y". ATen's comes
# from the setup cache's torch Python package (the same libtorch_cpu.so; "unknown"
# when LIBTORCH is the user's own), oneDNN's from its verbose report while mos runs
# the test fixture model once.
mos_kernel_check() {
    local mos=$1 aten="unknown" isa out
    local torch_site
    torch_site="$(mos_torch_home)/site"
    if [ -z "${LIBTORCH:-}" ] || [ "$LIBTORCH" = "$torch_site/torch" ]; then
        aten=$(PYTHONPATH="$torch_site" "${PYTHON:-python3}" -W ignore -c \
            'import torch; print(torch.backends.cpu.get_cpu_capability())' 2>/dev/null) || aten="unknown"
    fi
    out=$(mktemp -d)
    isa=$(ONEDNN_VERBOSE=1 "$mos" forward --model ResNetV2-R14x0.5 --model-path tests/fixtures/model/r14_bit.npz \
        --input tests/fixtures/model/r14_expected.safetensors --input-key x --output "$out/o.safetensors" \
        --device cpu 2>/dev/null | sed -n 's/^onednn_verbose,.*,info,cpu,isa:\(.*\)$/\1/p' | head -n 1)
    rm -rf "$out"
    printf 'ATen CPU capability: %s; oneDNN ISA: %s\n' "$aten" "${isa:-unknown}"
}
