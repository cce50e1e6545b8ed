#!/usr/bin/env bash
# The first hour, measured the way a newcomer meets it: two fresh venvs with an empty pip cache,
# - light: `pip install -e .` then `flux-gguf example` (cold numba cache, then warm);
# - test:  `pip install torch==2.13.0 && pip install -e '.[test]'`;
# each install's wall time and the bytes its site-packages holds (du).
# Usage: scripts/measure_install.sh WORK_DIR   (from the repository root; WORK_DIR is removed first)
# Prints one "key value" line per figure. Needs the network (or pip's configured local indexes).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${1:?usage: scripts/measure_install.sh WORK_DIR}
rm -rf "$work"
mkdir -p "$work"
export PIP_CACHE_DIR="$work/pip-cache"  # empty: what a new machine has
unset PYTHONPATH

seconds() { python3 -c 'import sys, time; print(f"{time.time() - float(sys.argv[1]):.1f}")' "$1"; }
site_bytes() { du -sb "$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" | cut -f1; }

python3 -m venv "$work/light"
t=$(date +%s.%N)
"$work/light/bin/pip" install -q -e "$repo"
echo "light_install_seconds $(seconds "$t")"
echo "light_site_packages_bytes $(site_bytes "$work/light")"
if "$work/light/bin/python" -c 'import torch' 2>/dev/null; then echo "light_has_torch yes"; else echo "light_has_torch no"; fi

# numba's cache sits beside the kernels (quant_kernels/__pycache__) unless NUMBA_CACHE_DIR says
# otherwise: point it at an empty folder so the first example is a fresh install's first run.
export NUMBA_CACHE_DIR="$work/numba-cache"
(cd "$work" && t=$(date +%s.%N) && "$work/light/bin/flux-gguf" example -o example-cold > /dev/null 2> cold.stderr \
  && echo "example_cold_seconds $(seconds "$t")")
(cd "$work" && t=$(date +%s.%N) && "$work/light/bin/flux-gguf" example -o example-warm > /dev/null 2> warm.stderr \
  && echo "example_warm_seconds $(seconds "$t")")
echo "example_cold_notice $(grep -c '^compiling quantization kernels' "$work/cold.stderr" || true)"
echo "example_warm_notice $(grep -c '^compiling quantization kernels' "$work/warm.stderr" || true)"

python3 -m venv "$work/test"
t=$(date +%s.%N)
"$work/test/bin/pip" install -q torch==2.13.0
"$work/test/bin/pip" install -q -e "$repo[test]"
echo "test_install_seconds $(seconds "$t")"
echo "test_site_packages_bytes $(site_bytes "$work/test")"
