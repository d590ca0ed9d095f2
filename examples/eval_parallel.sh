#!/usr/bin/env bash
# Several `qdiff eval` processes at once (e.g. on one GPU with many CPU cores), then one report.
#
#   examples/eval_parallel.sh OUT "MODEL[:JOBS] ..." "CONFIG ..." [qdiff eval options...]
#   examples/eval_parallel.sh docs "mnist_unet:2 cifar10_ddpm:4" "bf16 w8a8-int8 w4a8" --device cuda
#
# MODEL:JOBS splits that model's configs into JOBS consecutive chunks, one process each (default 1).
# Each process writes OUT/parts/MODEL-J/quality.json (quality.partial.json as it goes, so a process
# cut short keeps its rows) and OUT/parts/MODEL-J.log; the report is then assembled with
# --report-from, rows in the order of MODELS and CONFIGS. TIMEOUT=seconds bounds each process.
set -u
out=$1; models=$2; read -r -a configs <<<"$3"; shift 3
mkdir -p "$out/parts"
parts=()
for spec in $models; do
  m=${spec%%:*}; jobs=1; [ "$spec" = "$m" ] || jobs=${spec#*:}
  size=$(( (${#configs[@]} + jobs - 1) / jobs ))
  for ((j = 0; j * size < ${#configs[@]}; j++)); do
    ${TIMEOUT:+timeout "$TIMEOUT"} python -m qcompile.cli eval --models "$m" --configs "${configs[@]:j*size:size}" \
      --out "$out/parts/$m-$j" --quiet "$@" >"$out/parts/$m-$j.log" 2>&1 &
    parts+=("$out/parts/$m-$j")
  done
done
wait
found=()
for p in "${parts[@]}"; do
  f="$p/quality.json"; [ -f "$f" ] || f="$p/quality.partial.json"
  if [ -f "$f" ]; then found+=("$f"); else echo "eval_parallel: no rows from $p (see $p.log)" >&2; fi
done
device=cpu; lowering=reference; prev=
for a in "$@"; do case $prev in --device) device=$a ;; --lowering) lowering=$a ;; esac; prev=$a; done
run=$(python -c "import sys; from qcompile.evaluate import describe_run; print(describe_run(*sys.argv[1:]))" "$device" "$lowering")
python -m qcompile.cli eval --report-from "${found[@]}" --out "$out" --report-run "$run" \
  --report-command "${TIMEOUT:+TIMEOUT=$TIMEOUT }examples/eval_parallel.sh $out \"$models\" \"${configs[*]}\" $*" ${QDIFF_NOTES:+--notes "$QDIFF_NOTES"}
