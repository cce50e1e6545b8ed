#!/usr/bin/env bash
# Full-size `flux-gguf validate` on a GPU machine (used for docs/benchmarks.md's validation table).
# Usage: scripts/gpu_validate.sh SOURCE_DIR WORK_DIR OUT_DIR [VARIANT ...]
# Generates the synthetic checkpoint (seed 0, the one scripts/gpu_table.py uses), converts the
# variants in one pass, then validates each GGUF (per-tensor error + diffusers end to end on CUDA).
set -euo pipefail
src_dir=$1 work=$2 out=$3; shift 3
variants=("${@:-Q4_K_M}")
name=flux1-kontext-dev-synthetic
src=$src_dir/$name.safetensors
flux=(python3 -c "from converter.cli import main; main()")
mkdir -p "$src_dir" "$work" "$out"
[ -f "$src" ] || { echo "[$(date +%T)] generate"; python3 scripts/make_synthetic_flux.py -o "$src" >"$out/generate.log" 2>&1; }
args=(); for v in "${variants[@]}"; do args+=(--variant "$v"); done
echo "[$(date +%T)] convert ${variants[*]}"
/usr/bin/time -f "convert: %e s wall, %U s user, %M KB peak" "${flux[@]}" convert "$src" -o "$work" --name "$name" "${args[@]}" >/dev/null
for v in "${variants[@]}"; do
  echo "[$(date +%T)] validate $v"
  /usr/bin/time -f "validate $v: %e s wall" "${flux[@]}" validate "$work/$name-$v.gguf" --source "$src" --device cuda \
      -o "$out/validation.json" > "$out/validate-$v.txt"
  tail -n 30 "$out/validate-$v.txt"
done
echo "[$(date +%T)] done"
