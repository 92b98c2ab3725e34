#!/usr/bin/env bash
# Rebuild every committed table, comparison and report under results/ from the committed run
# records (config.json, metrics.json, log.csv, gates.csv, gate_knockout.json): no checkpoint,
# no training. `make results-tables` runs it; `git status` afterwards shows what changed.
# Figures (PNG) are left as committed: `domadapt compare DIR` redraws them.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DOMADAPT:-.venv/bin/domadapt}
for sweep in pacs pacs/long pacs/gate-rule-layer pacs-gates/base pacs-gates/layer \
             pacs-sketch-seeds styledigits-methods styledigits-selection styledigits-norms \
             pacs-long pacs-dg styledigits-regimes/stage1 styledigits-regimes/scratch \
             styledigits-regimes/pretrained styledigits-regimes/finetune \
             styledigits-regimes/pacs-scratch styledigits-regimes/pacs-scratch-lr1; do
    dir=results/$sweep
    [ -d "$dir/runs" ] || continue
    $D tables "$dir" > /dev/null
    for f in "$dir"/comparison_select-*.csv; do
        [ -e "$f" ] || continue
        rule=${f##*comparison_select-}
        $D tables "$dir" --select "${rule%.csv}" > /dev/null
    done
done
$D versus results/pacs results/pacs/gate-rule-layer --out results/pacs/gate-rule-layer > /dev/null
$D versus results/pacs results/pacs/long --out results/pacs/long > /dev/null
R=results/styledigits-regimes
$D versus $R/scratch $R/pretrained --out $R/pretrained > /dev/null
$D versus $R/pretrained $R/finetune --out $R/finetune > /dev/null
$D versus results/pacs $R/pacs-scratch --out $R/pacs-scratch > /dev/null
$D versus results/pacs $R/pacs-scratch-lr1 --out $R/pacs-scratch-lr1 > /dev/null
for sweep in pacs pacs/long pacs-long; do
    compgen -G "results/$sweep/runs/*/gate_knockout.json" > /dev/null || continue
    $D gate-knockout "results/$sweep" --quiet > /dev/null
done
if compgen -G "results/pacs-long/runs/*/metrics.json" > /dev/null; then
    $D evidence results/pacs-long --gates-beside results/styledigits > /dev/null
fi
echo "results/: tables rebuilt from the committed run records"
