"""Pretrain one demo encoder per objective and evaluate them all against random initialisation.

The evidence table of docs/objectives.md: each arm trains vit3d_tiny on the demo cohort with
the settings of `conf/pretrain/demo_all.yaml` restricted to its objectives (every arm keeps the
global `image` view, so all encoders are built for the same 48 x 96 x 96 input), exporting the
weights at the end of fit (no arm picks a checkpoint by a held-out metric: the SSL arms have
none that means anything). Then `fm3d eval-encoders` runs conf/eval/demo.yaml on the held-out
40 % of the patients with random initialisation as the reference of the paired differences.

  .venv/bin/python scripts/objective_evidence.py                 # all arms, ~25 min on 2 cores
  .venv/bin/python scripts/objective_evidence.py --arms dino mae --resamples 200
  .venv/bin/python scripts/objective_evidence.py --arms dino mae --seed 1   # another pretraining seed

`--seed` changes the pretraining seed only (`seed_everything`: initialisation, crops, masks);
the suite's split and bootstrap stay the same, so every seed is judged on the same patients.
An arm whose export exists is not trained again (delete runs/objectives-<arm>[-seed<k>] to retrain).
Prints the headline rows (linear-probe and kNN macro AUROC, survival C-index, retrieval R@5)
and the path of the suite's full results.md.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "conf/pretrain/demo_all.yaml"
# Each arm's objectives, and the views they read besides the global `image` view.
ARMS: dict[str, tuple[str, ...]] = {
    "voco": ("voco",),
    "clip": ("clip",),
    "demo": ("voco", "clip", "phenotype", "tte"),
    "dino": ("dino",),
    "mae": ("mae",),
    "all": ("voco", "dino", "mae", "clip", "phenotype", "tte"),
}
VIEWS = {"voco": "voco", "dino": "multicrop", "mae": "mae"}
HEADLINE = (
    ("linear_probe", "auroc_macro"),
    ("knn", "auroc_macro"),
    ("survival", "c_index_mean"),
    ("retrieval", "i2t_recall@5"),
)


def run_name(arm: str, seed: int) -> str:
    """The run name of an arm: objectives-<arm> for seed 0, objectives-<arm>-seed<k> otherwise."""
    return f"objectives-{arm}" if seed == 0 else f"objectives-{arm}-seed{seed}"


def arm_config(arm: str, seed: int = 0) -> dict:
    """demo_all.yaml restricted to the arm's objectives and views, exporting the last weights."""
    config = yaml.safe_load(BASE.read_text())
    keep = ARMS[arm]
    model, data = config["model"], config["data"]
    model["objectives"] = {name: spec for name, spec in model["objectives"].items() if name in keep}
    model["loss_weights"] = {name: w for name, w in model["loss_weights"].items() if name in keep}
    if len(keep) == 1:
        model["loss_weights"] = {keep[0]: 1.0}
    model.pop("monitor", None)
    model.pop("monitor_mode", None)
    wanted = {"image"} | {VIEWS[name] for name in keep if name in VIEWS}
    data["views"] = {name: view for name, view in data["views"].items() if name in wanted}
    if not {"phenotype", "tte"} & set(keep):
        data["labels"] = None
    config["name"] = run_name(arm, seed)
    config["seed_everything"] = seed
    config["trainer"]["limit_val_batches"] = 0  # export the end of fit
    return config


def pretrain(arm: str, seed: int, runs_root: Path, extra: list[str]) -> Path:
    """Train the arm unless its export exists; the export folder."""
    export = runs_root / run_name(arm, seed) / "latest" / "export" / "encoder"
    if export.is_dir():
        print(f"== {arm}: kept {export}")
        return export
    print(f"== {arm}: pretraining {', '.join(ARMS[arm])}", flush=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(arm_config(arm, seed), handle)
    fm3d = str(Path(sys.executable).with_name("fm3d"))
    command = [fm3d, "pretrain", "fit", "--config", handle.name, "--runs_root", str(runs_root), *extra]
    subprocess.run(command, check=True, cwd=ROOT)
    return export


def headline(results_csv: Path) -> list[str]:
    """The headline metrics of results.csv as markdown rows, value [95 % interval] and paired Δ."""
    lines = [
        "| protocol | metric | encoder | value [interval] | Δ vs random [interval] |",
        "|---|---|---|---|---|",
    ]
    for row in csv.DictReader(results_csv.open()):
        if (row["protocol"], row["metric"]) not in HEADLINE:
            continue
        value = f"{float(row['value']):.3f} [{float(row['ci_low']):.3f}, {float(row['ci_high']):.3f}]"
        diff = row["verdict"]
        if row["diff"]:
            low, high = float(row["diff_low"]), float(row["diff_high"])
            diff = f"{float(row['diff']):+.3f} [{low:+.3f}, {high:+.3f}] {diff}"
        lines.append(f"| {row['protocol']} | {row['metric']} | {row['encoder']} | {value} | {diff} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    parser.add_argument("--runs-root", type=Path, default=ROOT / "runs")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the suite")
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed (default 0)")
    parser.add_argument(
        "--pretrain-args", nargs=argparse.REMAINDER, default=[], help="extra fm3d pretrain fit options"
    )
    args = parser.parse_args(argv)
    exports = {arm: pretrain(arm, args.seed, args.runs_root, args.pretrain_args) for arm in args.arms}
    first = next(iter(exports.values()))
    encoders = [f"random=random:{first}", *(f"{arm}={path}" for arm, path in exports.items())]
    out = args.runs_root / "eval" / ("objectives" if args.seed == 0 else f"objectives-seed{args.seed}")
    command = [
        str(Path(sys.executable).with_name("fm3d")),
        "eval-encoders",
        "--config",
        str(ROOT / "conf/eval/demo.yaml"),
        "--encoders",
        *encoders,
        "--resamples",
        str(args.resamples),
        "--runs-root",
        str(args.runs_root),
        "--out",
        str(out),
    ]
    print("== evaluation suite: " + " ".join(encoders), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    print("\n".join(headline(out / "results.csv")))
    print(f"every metric: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
