#!/usr/bin/env bash
# The GPU machine's Python environment, rehearsed on a CPU machine, so that a GPU run does not
# spend its first minutes on a version error (issue 31 part 5).
#
#   bash tools/rehearse_gpu_image.sh                 # everything
#   bash tools/rehearse_gpu_image.sh --quick         # the tests only, no benchmarks/gpu_suite.py
#   bash tools/rehearse_gpu_image.sh --suite         # benchmarks/gpu_suite.py only
#   bash tools/rehearse_gpu_image.sh -- -k lock      # extra pytest arguments after --
#
# It builds (once, or again when tools/gpu_image.txt changes) a Python 3.12 venv outside the
# repository with the image's torch 2.11 / triton 3.6 and the packages of tools/gpu_image.txt
# (REHEARSAL_VENV, default ../venv211: about 5.5 GB, 8 min; torch's wheel is a CUDA build), and
# .site/ with what the image lacks (deepspeed, bitsandbytes, datasets, pydantic) by
# tools/build_site.sh, put first on PYTHONPATH exactly as on the GPU machine. Then:
#   1. the versions and `python -m setr_lowmem.compat` (every private API present, in seconds);
#   2. the tests that touch the private APIs and the Triton kernels (interpreted), and the
#      extension-build lock tests (tests/test_torch_versions.py);
#   3. `benchmarks/gpu_suite.py --tiny`, every stage, on the CPU (two paper configs of 5 iterations:
#      all nine at 30 took 27 min here).
# Its own TORCH_EXTENSIONS_DIR (in the venv) keeps its builds of DeepSpeed's ops apart from the
# CPU venv's. Exit status: non-zero when a step fails; the log is in $REHEARSAL_OUT (default
# runs/rehearsal), with the suite's files.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${REHEARSAL_VENV:-$(cd "$root/.." && pwd)/venv211}
out=${REHEARSAL_OUT:-$root/runs/rehearsal}
pins=$root/tools/gpu_image.txt
[ -f "$pins" ] || { echo "error: $pins not found: run the script from its checkout" >&2; exit 2; }
quick=0
suite_only=0
pytest_extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --suite) suite_only=1 ;;
    --) shift; pytest_extra=("$@"); break ;;
    *) echo "usage: $0 [--quick | --suite] [-- pytest arguments]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
start=$(date +%s)
say() { echo "[rehearsal $(( $(date +%s) - start )) s] $*"; }

if [ ! -f "$venv/.gpu_image.txt" ] || ! cmp -s "$pins" "$venv/.gpu_image.txt"; then
  python=""
  for p in ${REHEARSAL_PYTHON:-} python3.12 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12; do
    if "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then python=$p; break; fi
  done
  [ -n "$python" ] || { echo "error: no Python 3.12 found (set REHEARSAL_PYTHON): the GPU machine runs 3.12" >&2; exit 2; }
  say "building $venv from tools/gpu_image.txt with $python"
  if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then
    echo "error: $venv exists and is not a virtual environment: set REHEARSAL_VENV to another folder" >&2; exit 2
  fi
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r "$pins"
  # the image has none of these (a newer typer pulls pydantic in): they must come from .site
  "$venv/bin/python" -m pip uninstall -q -y deepspeed bitsandbytes datasets pydantic pydantic-core 2>/dev/null || true
  cp "$pins" "$venv/.gpu_image.txt"
  say "venv built: $(du -sh "$venv" | cut -f1)"
fi
if [ ! -d "$root/.site/deepspeed" ]; then
  bash "$root/tools/build_site.sh"
fi

. "$venv/bin/activate"
export PYTHONPATH=$root/.site:$root PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=$venv/torch_extensions
cd "$root"
status=0

say "1. versions and private APIs"
python -c "import sys, torch, triton, numpy, deepspeed, bitsandbytes, datasets, pydantic, timm, accelerate
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__,
      'deepspeed', deepspeed.__version__, 'bitsandbytes', bitsandbytes.__version__, 'datasets', datasets.__version__,
      'pydantic', pydantic.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)" 2>&1 | grep -v WARNING
python -m setr_lowmem.compat | tee "$out/compat.txt"
if grep -q MISSING "$out/compat.txt"; then say "a private API is missing"; status=1; fi

if [ $suite_only = 0 ]; then
say "2. tests that touch the private APIs, the Triton kernels and the build lock"
tests=(tests/test_torch_versions.py tests/test_forecast.py tests/test_decoder.py tests/test_kernels.py
       tests/test_techniques.py tests/test_faults.py
       "tests/test_profiler.py::test_categories_add_up_to_the_measured_total"
       "tests/test_profiler.py::test_the_root_only_tracker_reports_what_the_stock_tracker_does"
       "tests/test_profiler.py::test_memory_timeline_png"
       "tests/test_profiler.py::test_the_planner_measures_the_step_that_training_runs")
python -m pytest -q -p no:cacheprovider --durations=10 "${tests[@]}" "${pytest_extra[@]}" 2>&1 | tee "$out/pytest.txt" \
  || status=1
fi

if [ $quick = 0 ]; then
  say "3. benchmarks/gpu_suite.py --tiny"
  rm -rf "$out/gpu_suite"
  python benchmarks/gpu_suite.py --tiny --minutes 30 --configs pup_ade20k mla_cityscapes --iters 5 \
    --out "$out/gpu_suite" 2>&1 | tee "$out/gpu_suite.txt" || status=1
  if ls "$out"/gpu_suite/failed-* >/dev/null 2>&1 || grep -Eq "FAILED|exit [1-9]|exits \[[^]]*[1-9]" "$out/gpu_suite.txt"; then
    say "a gpu_suite stage failed"; status=1
  fi
fi
say "done: exit $status (log and files in $out)"
exit $status
