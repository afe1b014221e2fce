#!/usr/bin/env bash
# The GPU checks in one go (under 12 minutes on one GPU): the tests marked gpu, then the
# benchmarks with --device cuda, writing bench/results/*_gpu.json. Run from anywhere:
#     bash bench/gpu.sh
# Without CUDA it says so and exits 0. Packages missing from the machine (see
# bench/gpu-requirements.txt) are installed from wheels in .whl/ at the repository root, without
# the network; bench/README.md says how to fill it. The package is used in place (PYTHONPATH),
# not installed.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python3}"

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
    echo "bench/gpu.sh: no CUDA device here (torch missing or torch.cuda.is_available() is False):" \
        "skipping the GPU tests and benchmarks."
    exit 0
fi

# pip name -> module name, for each requirement that is not importable yet.
missing=()
while read -r requirement; do
    name="${requirement%%[<>=]*}"
    module="$name"
    [ "$name" = "pillow" ] && module="PIL"
    "$python" -c "import $module" 2>/dev/null || missing+=("$requirement")
done < <(grep -v '^#' bench/gpu-requirements.txt | grep -v '^$')
if [ "${#missing[@]}" -gt 0 ]; then
    if [ ! -d .whl ]; then
        echo "bench/gpu.sh: missing ${missing[*]} and no .whl/ folder to install them from;" \
            "fill it as bench/README.md says." >&2
        exit 2
    fi
    echo "installing from .whl/: ${missing[*]}"
    install=("$python" -m pip install --quiet --no-index --find-links .whl "${missing[@]}")
    # A distribution's Python may refuse installs outside a virtual environment (PEP 668).
    if ! "${install[@]}" && ! "${install[@]}" --break-system-packages; then
        echo "bench/gpu.sh: could not install ${missing[*]} from .whl/ (see above)." >&2
        exit 2
    fi
fi

"$python" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
failed=()
step() {
    local seconds="$1" label="$2"
    shift 2
    echo "== $label (at most ${seconds}s)"
    local started=$SECONDS
    if timeout "$seconds" "$@"; then
        echo "== $label: ok in $((SECONDS - started))s"
    else
        echo "== $label: FAILED (exit $?) after $((SECONDS - started))s"
        failed+=("$label")
    fi
}

mapfile -t gpu_tests < <(grep -l 'mark\.gpu' tests/test_*.py)
step 150 "pytest -m gpu" "$python" -m pytest -m gpu -q -p no:cacheprovider "${gpu_tests[@]}"
step 45 "bench.regenerate" "$python" -m bench.regenerate --device cuda
step 150 "bench.alpha_step" "$python" -m bench.alpha_step --device cuda
step 60 "bench.materialize" "$python" -m bench.materialize --device cuda
if "$python" -c "import onnxruntime, sys; sys.exit('CUDAExecutionProvider' not in onnxruntime.get_available_providers())"
then
    step 45 "bench.export_infer" "$python" -m bench.export_infer --device cuda --tasks 5 --repeats 10
    step 240 "bench.serving" "$python" -m bench.serving --device cuda --gem-tasks 100 \
        --resnet-tasks 20 --gem-requests 200 --resnet-requests 60 --repeats 3
else
    echo "== bench.export_infer, bench.serving: skipped (this onnxruntime has no CUDA provider; install onnxruntime-gpu)"
fi

ls -l bench/results/*_gpu.json 2>/dev/null
if [ "${#failed[@]}" -gt 0 ]; then
    echo "bench/gpu.sh: failed: ${failed[*]}" >&2
    exit 1
fi
echo "bench/gpu.sh: all GPU checks passed."
