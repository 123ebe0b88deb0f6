"""Time and peak memory of the encoder evaluation suite on the demo cohort, first run and rerun.

    python benchmarks/eval_suite.py              # after `make demo`: conf/eval/demo.yaml, all protocols
    python benchmarks/eval_suite.py --quick      # 64 resamples, linear probe and kNN only

Three encoders of the demo run (`runs/demo/latest` unless --run): the same architecture
randomly initialised, the exported (best) encoder and the last Lightning checkpoint. The suite
runs twice, each time in a fresh child process (`fm3d eval-encoders`'s library call) with its
own peak RSS: first with an empty store of features and figures, then again, reusing them. The
table splits the first run into feature extraction, protocol fitting and bootstrap; the rerun
must take under 10 % of the first. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _common
import yaml

REPO = _common.REPO

CHILD = "--child"


def child(config_path: str, run: str, work: str) -> None:
    """One suite run (in this process); prints its timings as one JSON line."""
    from downstream.evaluation.config import SuiteConfig
    from downstream.evaluation.suite import evaluate_encoders

    export = Path(run) / "export" / "encoder"
    encoders = [
        f"random=random:{export}",
        f"pretrained={export}",
        f"last={Path(run) / 'checkpoints' / 'last.ckpt'}",
    ]
    start = time.perf_counter()
    outcome = evaluate_encoders(
        SuiteConfig.from_yaml(config_path), encoders, Path(work), device="cpu", show_progress=False
    )
    timings = {**outcome.timings_s, "total_s": time.perf_counter() - start, "rows": outcome.table.height}
    print(json.dumps(timings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "conf" / "eval" / "demo.yaml")
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo" / "latest")
    parser.add_argument("--quick", action="store_true", help="64 resamples, linear probe and kNN only")
    parser.add_argument(CHILD, nargs=3, metavar=("CONFIG", "RUN", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if not (args.run / "export" / "encoder").is_dir():
        sys.exit(f"{args.run}/export/encoder is missing: run `make demo` first (or pass --run)")
    config = yaml.safe_load(args.config.read_text())
    config["data"]["cache_dir"] = str(REPO / config["data"]["cache_dir"])
    for settings in config["protocols"].values():
        for key, value in settings.items():
            if isinstance(value, str) and (REPO / value).is_file():
                settings[key] = str(REPO / value)
    if args.quick:
        config["bootstrap"]["resamples"] = 64
        config["protocols"] = {k: v for k, v in config["protocols"].items() if k in {"linear_probe", "knn"}}
    with tempfile.TemporaryDirectory() as temporary:
        config["features_dir"] = str(Path(temporary) / "kept")
        config_path = Path(temporary) / "suite.yaml"
        config_path.write_text(yaml.safe_dump(config))
        argv = [__file__, CHILD, str(config_path), str(args.run), str(Path(temporary) / "work")]
        first, rerun = _common.run_child(argv), _common.run_child(argv)
    rows = []
    for name, result in (("first run", first), ("rerun, kept features and figures", rerun)):
        report = result.report
        rows.append([
            name, *(f"{report[k]:.1f}" for k in ("features_s", "protocols_s", "bootstrap_s", "total_s")),
            f"{result.peak_rss_mib:.0f}",
        ])  # fmt: skip
    share = rerun.report["total_s"] / first.report["total_s"]
    protocols = ", ".join(config["protocols"])
    print(f"### Evaluation suite: 3 encoders, {protocols}; {config['bootstrap']['resamples']} resamples\n")
    print(_common.markdown_table(
        ["run", "features s", "protocols s", "bootstrap s", "total s", "peak RSS MiB"], rows,
        [False, True, True, True, True, True],
    ))  # fmt: skip
    print(f"\nRerun / first run: {share:.1%} (must be under 10 %). {_common.machine_line()}")


if __name__ == "__main__":
    main()
