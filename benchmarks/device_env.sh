# Sourced by the device scripts (gpu_day.sh, gpu_graphs_day.sh), first thing: the shared set-up.
# Sets repo (this checkout), out (the report folder: $OUT, made), py ($PYTHON, default python3); puts the
# packed wheels of benchmarks/pack_for_device.py (.device/) and this checkout on PYTHONPATH, and the
# packed real CTs on DIFFPROBE_SHARED_DATA. Where SimpleITK and nnunetv2 are importable already (a CPU
# check here), nothing is installed.
set -uo pipefail
export PYTHONUNBUFFERED=1
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:?set OUT to the folder the reports go to}"
py="${PYTHON:-python3}"
mkdir -p "$out"
pack="$repo/.device"
if [[ -f "$pack/sitk.tar.xz" ]] && ! "$py" -c "import SimpleITK, nnunetv2" 2>/dev/null; then
    site=/tmp/site
    mkdir -p "$site" && tar xJf "$pack/sitk.tar.xz" -C "$site" \
        && "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$pack"/whl/*.whl || { echo "installing the packed wheels failed" >&2; exit 3; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
[[ -d "$pack/data" ]] && export DIFFPROBE_SHARED_DATA="$pack/data"
"$py" -c "import diffprobe.cli.app, SimpleITK, nnunetv2, torch; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 4
