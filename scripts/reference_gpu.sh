#!/usr/bin/env bash
# The reference run on a GPU machine, two variants at once (one per GPU), through the real `run`:
#   bash scripts/reference_gpu.sh <corpus glob> <out dir> "<overrides A>" "<overrides B>"
# Each variant: its own bucket under /tmp, configs/reference-h200.yaml plus its overrides, then the
# export's plain model.generate() checked for repetition (scripts/check_default_generation.py).
# Results (metrics, samples, report, eval, logs) are packed into <out dir>/<variant>.tgz.
set -u
corpus=$1; out=$2; shift 2
i=0
for overrides in "$@"; do
  name=v$i
  (
    export CUDA_VISIBLE_DEVICES=$i PYTHONUNBUFFERED=1
    root=/tmp/ref-$name
    # shellcheck disable=SC2086
    timeout 520 python entrypoint.py run --config configs/reference-h200.yaml --run.id="ref-$name" \
      --storage.bucket="$root/bucket" --storage.local_dir="$root/work" --data.sources="[$corpus]" $overrides \
      > "$root.log" 2>&1
    echo "exit $?" >> "$root.log"
    final="$root/bucket/runs/ref-$name/final"
    [ -d "$final" ] && timeout 60 python scripts/check_default_generation.py "$final" > "$root-generate.json" 2>> "$root.log"
    mkdir -p "$root/pack"
    cp "$root.log" "$root-generate.json" "$root/pack/" 2>/dev/null
    cp -r "$root/bucket/runs/ref-$name/"{metrics.jsonl,samples.jsonl,config.yaml,report} "$root/pack/" 2>/dev/null
    cp "$final/generation_config.json" "$root/pack/" 2>/dev/null
    tar -czf "$out/$name.tgz" -C "$root/pack" .
  ) &
  i=$((i + 1))
done
wait
