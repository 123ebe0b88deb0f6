#!/usr/bin/env bash
# The fm3d demo, end to end on CPU in a few minutes (what `make demo` runs):
#   1. a synthetic cohort of 128 CT studies with reports and MEDS EHR   (fm3d demo-data)
#   2. per-study phenotype and time-to-event labels from the EHR         (fm3d ehr labels)
#   3. the prepared CT cache                                             (fm3d prepare)
#   4. a from-scratch report tokenizer + tiny BERT (no download)         (fm3d.text.init_text_model)
#   5. vit3d_tiny pretrained with VoCo + CLIP + phenotype + TTE          (fm3d pretrain fit)
# and prints the run folder, the MLflow store and the final metrics.
#
#   bash scripts/demo.sh [extra `fm3d pretrain fit` options, e.g. --trainer.max_epochs 2]
#
# Steps 1-4 write to demo/ (the paths conf/pretrain/demo.yaml reads) and are skipped when
# their output exists, so a rerun only pretrains again; `rm -rf demo` starts over. demo/
# records the settings it was built with: a demo/ from other settings (an older version of
# this script) is rebuilt, since demo.yaml's label widths follow these settings.
set -euo pipefail
cd "$(dirname "$0")/.."
fm3d=${FM3D:-fm3d}
python=${PYTHON:-python}
demo=demo
cohort=(--studies 128 --seed 0)
settings="demo-data ${cohort[*]}; ehr labels: every qualifying task"

if [ -d "$demo" ] && [ "$(cat "$demo/.settings" 2>/dev/null)" != "$settings" ]; then
  echo "== $demo/ was built with other settings; rebuilding it"
  rm -rf "$demo"
fi
if [ ! -f "$demo/manifest.parquet" ]; then
  echo "== 1/5 demo cohort -> $demo/"
  "$fm3d" demo-data --out "$demo" "${cohort[@]}"
  echo "$settings" > "$demo/.settings"
fi
if [ ! -f "$demo/ehr_labels.parquet" ]; then
  echo "== 2/5 EHR labels -> $demo/ehr_labels.parquet"
  "$fm3d" ehr labels --meds "$demo/meds" --studies "$demo/manifest.parquet" \
    --phenotypes "$demo/phenotypes.yaml" --out "$demo/ehr_labels.parquet"
fi
echo "== 3/5 prepared cache -> $demo/cache (resumes; up-to-date studies are skipped)"
"$fm3d" prepare --manifest "$demo/manifest.parquet" --out "$demo/cache" --no-progress
if [ ! -f "$demo/text_model/config.json" ]; then
  echo "== 4/5 report text model -> $demo/text_model"
  "$python" - "$demo" <<'PY'
import sys
from pathlib import Path

import polars as pl

from fm3d.text import init_text_model

demo = Path(sys.argv[1])
manifest = pl.read_parquet(demo / "manifest.parquet")
texts = [f"{f or ''}\n{i or ''}" for f, i in zip(manifest["findings"], manifest["impression"], strict=True)]
init_text_model(demo / "text_model", texts, vocab_size=500, hidden_size=64, num_layers=2, num_heads=2,
                max_length=128)
PY
fi
echo "== 5/5 pretraining (conf/pretrain/demo.yaml)"
"$fm3d" pretrain fit --config conf/pretrain/demo.yaml "$@"
