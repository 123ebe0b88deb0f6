#!/usr/bin/env bash
# The fm3d demo, end to end on CPU (what `make demo` runs; README.md says how long it takes):
#   1. a synthetic cohort of 512 CT studies with reports and MEDS EHR   (fm3d demo-data)
#   2. per-study phenotype and time-to-event labels from the EHR         (fm3d ehr labels)
#   3. the prepared CT cache                                             (fm3d prepare)
#   4. report embeddings of a pretrained text model, cached (offline)    (fm3d text-cache build)
#   5. vit3d_tiny pretrained with VoCo + CLIP + phenotype + TTE          (fm3d pretrain fit)
#   6. the evaluation suite on the held-out studies: the pretrained encoder against the same
#      architecture randomly initialised                                 (fm3d eval-encoders)
# into runs/demo/<timestamp>/ (runs/demo/latest points at it; the encoder and CLIP heads are
# exported under export/) and runs/eval/demo/<timestamp>/ (results.md: the table), then prints
# the time each step took and the total.
#
#   bash scripts/demo.sh [extra `fm3d pretrain fit` options, e.g. --trainer.max_epochs 2]
#   EVAL_ARGS="--resamples 100" bash scripts/demo.sh   # extra `fm3d eval-encoders` options
#
# Steps 1-4 write to demo/ (the paths conf/pretrain/demo.yaml and conf/downstream/*.yaml read);
# steps 1-2 are skipped when their output exists and steps 3-4 resume, so a rerun only
# pretrains again; `rm -rf demo`
# starts over. demo/ records the settings it was built with: a demo/ from other settings (an
# older version of this script) is rebuilt, since demo.yaml's label widths follow them.
set -euo pipefail
cd "$(dirname "$0")/.."
fm3d=${FM3D:-fm3d}
demo=demo
cohort=(--studies 512 --seed 0)
settings="demo-data ${cohort[*]}; ehr labels: every qualifying task"
timings=()

# Run one step and record how long it took.
step() {
  local name=$1 start=$SECONDS
  shift
  "$@"
  timings+=("$name $((SECONDS - start)) s")
}

if [ -d "$demo" ] && [ "$(cat "$demo/.settings" 2>/dev/null)" != "$settings" ]; then
  echo "== $demo/ was built with other settings; rebuilding it"
  rm -rf "$demo"
fi
if [ ! -f "$demo/manifest.parquet" ]; then
  echo "== 1/6 demo cohort -> $demo/"
  step cohort "$fm3d" demo-data --out "$demo" "${cohort[@]}" --quiet
  echo "$settings" > "$demo/.settings"
fi
if [ ! -f "$demo/ehr_labels.parquet" ]; then
  echo "== 2/6 EHR labels -> $demo/ehr_labels.parquet"
  step labels "$fm3d" ehr labels --meds "$demo/meds" --studies "$demo/manifest.parquet" \
    --phenotypes "$demo/phenotypes.yaml" --out "$demo/ehr_labels.parquet"
fi
echo "== 3/6 prepared cache -> $demo/cache (resumes; up-to-date studies are skipped)"
step cache "$fm3d" prepare --manifest "$demo/manifest.parquet" --out "$demo/cache" --no-progress
# Settings as demo.yaml's CLIP text tower (model, max length; pooling and prefix the model's
# own); a cache built otherwise is refused by the run. Resumes, and embeds changed reports only.
echo "== 4/6 report embeddings -> $demo/text_cache (sentence-transformers/all-MiniLM-L6-v2, frozen)"
step text-cache "$fm3d" text-cache build --model sentence-transformers/all-MiniLM-L6-v2 \
  --reports "$demo/manifest.parquet" --columns impression --max-length 128 --out "$demo/text_cache" --no-progress
echo "== 5/6 pretraining (conf/pretrain/demo.yaml)"
step pretraining "$fm3d" pretrain fit --config conf/pretrain/demo.yaml "$@"
echo "== 6/6 evaluation suite (conf/eval/demo.yaml) -> runs/eval/demo/latest/results.md"
# shellcheck disable=SC2086  # EVAL_ARGS is a list of options
step evaluation "$fm3d" eval-encoders --config conf/eval/demo.yaml ${EVAL_ARGS:-} \
  --encoders random=random:runs/demo/latest/export/encoder pretrained=runs/demo/latest/export/encoder
printf -v total '%d:%02d' $((SECONDS / 60)) $((SECONDS % 60))
echo "== demo done in $total (m:ss; $(IFS=,; echo "${timings[*]}" | sed 's/,/, /g')), on $(nproc) cores"
