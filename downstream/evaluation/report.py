"""The suite's output: one table (markdown and CSV), a plot with the intervals, and the notes.

In the markdown table encoders are columns and (protocol, metric) rows; a cell reads
`0.812 [0.741, 0.880]`, and every encoder after the first has a second column with its paired
difference to the first, `+0.103 [0.031, 0.170]`, or `no difference (+0.020 [-0.040, 0.081])`
when the interval holds zero. `results.csv` holds the same in long form, one row per
(protocol, metric, encoder). `suite.json` records what a reader needs to trust the table: the
config, seeds, each encoder's source, weights hash, input spec and how its input departed from
the prepared studies (resampling), what each protocol selected on validation, what was skipped
and why, and the timings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import polars as pl

from downstream.base import safe_name
from downstream.evaluate import to_markdown
from downstream.evaluation.suite import NO_DIFFERENCE, SuiteOutcome
from fm3d.atomic import write_text_atomic

DETAIL_FOLDER = "details"


def _interval(value: float | None, low: float | None, high: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    sign = "+" if signed else ""
    if low is None or low != low:
        return f"{value:{sign}.3f}"
    return f"{value:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def wide_table(outcome: SuiteOutcome) -> pl.DataFrame:
    """Rows (protocol, metric), a column per encoder and per paired difference, cells as text."""
    labels = [e["label"] for e in outcome.encoders]
    reference = labels[0]
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for row in outcome.table.iter_rows(named=True):
        line = cells.setdefault((row["protocol"], row["metric"]), {})
        line[row["encoder"]] = _interval(row["value"], row["ci_low"], row["ci_high"])
        if row["diff"] is not None:
            text = _interval(row["diff"], row["diff_low"], row["diff_high"], signed=True)
            line[f"Δ {row['encoder']} − {reference}"] = (
                f"{NO_DIFFERENCE} ({text})" if row["verdict"] == NO_DIFFERENCE else text
            )
    columns = ["protocol", "metric"]
    for label in labels:
        columns.append(label)
        if label != reference:
            columns.append(f"Δ {label} − {reference}")
    return pl.DataFrame(
        [
            {"protocol": p, "metric": m, **{c: line.get(c, "") for c in columns[2:]}}
            for (p, m), line in cells.items()
        ],
        schema={c: pl.String for c in columns},
    )


def headline_rows(outcome: SuiteOutcome) -> pl.DataFrame:
    """The rows of each protocol's headline metric (what the plot shows)."""
    from downstream.evaluation.protocol import PROTOCOLS

    keep = [
        (name, PROTOCOLS.get(name).headline) for name in outcome.table["protocol"].unique(maintain_order=True)
    ]
    return outcome.table.filter(
        pl.any_horizontal(*[(pl.col("protocol") == p) & (pl.col("metric") == m) for p, m in keep])
    )


def interval_figure(outcome: SuiteOutcome) -> plt.Figure:
    """Each protocol's headline metric per encoder, with its interval (one panel per protocol)."""
    rows = headline_rows(outcome)
    protocols = rows["protocol"].unique(maintain_order=True).to_list()
    figure, axes = plt.subplots(
        1, max(len(protocols), 1), figsize=(3.2 * max(len(protocols), 1), 3.2), squeeze=False
    )
    for axis, protocol in zip(axes[0], protocols, strict=False):
        part = rows.filter(pl.col("protocol") == protocol)
        values = part["value"].to_numpy()
        low, high = (
            part["ci_low"].fill_null(float("nan")).to_numpy(),
            part["ci_high"].fill_null(float("nan")).to_numpy(),
        )
        positions = range(part.height)
        axis.errorbar(positions, values, yerr=[values - low, high - values], fmt="o", capsize=4)
        axis.set_xticks(list(positions), part["encoder"].to_list(), rotation=30, ha="right", fontsize=8)
        axis.set_title(f"{protocol}\n{part['metric'][0]}", fontsize=9)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def describe(outcome: SuiteOutcome) -> dict[str, Any]:
    """What suite.json records (see the module docstring)."""
    config = outcome.config
    return {
        "name": config.name,
        "seed": config.seed,
        "data": {
            "cache_dir": str(config.data.cache_dir),
            "split_fractions": list(config.data.split_fractions),
            "split_seed": config.data.split_seed,
        },
        "bootstrap": {
            "resamples": config.bootstrap.resamples,
            "confidence": config.bootstrap.confidence,
            "unit": "patient",
            "seed": config.seed,
        },
        "protocols": config.protocols,
        "encoders": outcome.encoders,
        "selected": {f"{p}/{e}": r.selected for (p, e), r in outcome.results.items() if r.selected},
        "skipped": {f"{p}/{e}": reason for (p, e), reason in outcome.skipped.items()},
        "timings_s": outcome.timings_s,
    }


def markdown_report(outcome: SuiteOutcome) -> str:
    """The report: the table, then the encoders and their input, what was skipped, and the seeds."""
    config = outcome.config
    confidence = round(100 * config.bootstrap.confidence)
    text = [
        f"# Encoder evaluation: {config.name}\n",
        f"Value [{confidence} % interval] over {config.bootstrap.resamples} patient-level bootstrap "
        f"resamples of the test split (seed {config.seed}); Δ is each encoder minus "
        f"{outcome.encoders[0]['label']} on the same resamples (paired), 'no difference' where its "
        "interval holds zero.\n",
        to_markdown(wide_table(outcome)),
        "\n## Encoders\n\n",
    ]
    for encoder in outcome.encoders:
        spec = encoder["input_spec"]
        weights = f"random initialisation (seed {config.seed})" if encoder["random_init"] else "weights"
        notes = "; ".join(encoder["input_notes"]) or "read as prepared (no resampling)"
        text.append(
            f"- **{encoder['label']}**: {encoder['source']} ({weights}, hash {encoder['identity'][:12]}); "
            f"spacing {spec['target_spacing_mm']} mm, HU window {spec['hu_window']}, intensity "
            f"{spec['intensity_range']}, axes {spec['axis_order']}, size {spec['image_size']}; "
            f"input: {notes}\n"
        )
    if outcome.skipped:
        text.append("\n## Not run\n\n")
        text += [f"- {p} for {e}: {reason}\n" for (p, e), reason in outcome.skipped.items()]
    selected = describe(outcome)["selected"]
    if selected:
        text.append("\n## Settings each run used (chosen on val where a protocol chooses)\n\n")
        text += [f"- {key}: {json.dumps(value)}\n" for key, value in selected.items()]
    return "".join(text)


def write_report(outcome: SuiteOutcome, out_dir: str | Path) -> list[Path]:
    """Write results.md, results.csv, intervals.png, suite.json and the protocols' detail tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.csv", out / "results.md", out / "suite.json", out / "intervals.png"]
    outcome.table.write_csv(written[0])
    write_text_atomic(written[1], markdown_report(outcome))
    write_text_atomic(written[2], json.dumps(describe(outcome), indent=2, default=str) + "\n")
    figure = interval_figure(outcome)
    figure.savefig(written[3], dpi=120)
    plt.close(figure)
    for (protocol, encoder), result in outcome.results.items():
        for name, detail in result.tables.items():
            path = out / DETAIL_FOLDER / protocol / f"{safe_name(encoder)}__{safe_name(name)}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            detail.write_csv(path)
            written.append(path)
    return written
