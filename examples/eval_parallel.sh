#!/usr/bin/env bash
# One `qdiff eval` process per model at once (e.g. on one GPU with many CPU cores), then one report.
#
#   examples/eval_parallel.sh OUT "MODELS" [qdiff eval options...]
#   examples/eval_parallel.sh docs "mnist_unet mnist_vit cifar10_ddpm cifar10_dit" --device cuda --configs bf16 w8a8-int8
#
# Each model writes OUT/parts/MODEL/quality.json (and quality.partial.json as it goes, so a run cut
# short keeps its rows) and OUT/parts/MODEL.log; the report is then assembled with --report-from.
set -u
out=$1; models=$2; shift 2
mkdir -p "$out/parts"
for m in $models; do
  python -m qcompile.cli eval --models "$m" --out "$out/parts/$m" --quiet "$@" >"$out/parts/$m.log" 2>&1 &
done
wait
parts=()
for m in $models; do
  f="$out/parts/$m/quality.json"; [ -f "$f" ] || f="$out/parts/$m/quality.partial.json"
  if [ -f "$f" ]; then parts+=("$f"); else echo "eval_parallel: no rows for $m (see $out/parts/$m.log)" >&2; fi
done
device=cpu; lowering=reference; prev=
for a in "$@"; do case $prev in --device) device=$a ;; --lowering) lowering=$a ;; esac; prev=$a; done
run=$(python -c "import sys; from qcompile.evaluate import describe_run; print(describe_run(*sys.argv[1:]))" "$device" "$lowering")
python -m qcompile.cli eval --report-from "${parts[@]}" --out "$out" --report-run "$run" \
  --report-command "examples/eval_parallel.sh $out \"$models\" $*" ${QDIFF_NOTES:+--notes "$QDIFF_NOTES"}
