"""Code vocabulary: counts, MOTOR's entropy-based task selection, and phenotype code sets.

Task selection follows femr's MOTOR recipe (som-shahlab/femr,
`src/femr/models/tokenizer/hierarchical_tokenizer.py::convert_statistics_to_msgpack`, whose
vocabulary order `MOTORTask.fit_pretraining_task_info` takes its tasks from): for each code c,
p_c is the fraction of subjects with at least one c (after adding every ancestor of each code
when parents are expanded), `baseline_c = min(1, p_parent for each direct parent)`,
`w_c = min(1, p_c / baseline_c)` and the score is the parent-weighted negative conditional
entropy `baseline_c * (w ln w + (1 - w) ln(1 - w))`. Codes with w in {0, 1} carry no
information and are dropped, as are codes whose score is above `h(min_event_fraction)`
(rarer than that fraction, for a parentless code); the K lowest scores (most entropy) win.
Only timed events count: static codes (null time) can never be a time-to-event outcome.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import polars as pl
import yaml

from ehr.errors import TaskSpecError
from ehr.meds import MEDSDataset

logger = logging.getLogger(__name__)


def code_counts(dataset: MEDSDataset) -> pl.DataFrame:
    """Per code: number of events and of distinct subjects, most frequent first."""
    return (
        dataset.events(columns=("subject_id", "code"))
        .group_by("code")
        .agg(events=pl.len(), subjects=pl.col("subject_id").n_unique())
        .sort(["events", "code"], descending=[True, False])
        .collect(engine="streaming")
    )


def code_ancestors(dataset: MEDSDataset) -> pl.DataFrame:
    """(code, ancestor) pairs: each code with itself and every transitive `parent_codes` ancestor."""
    edges = (
        dataset.codes()
        .select("code", parent="parent_codes")
        .explode("parent")
        .drop_nulls()
        .unique()
        .collect()
    )
    closure = pl.concat(
        [edges.select("code", ancestor="code").unique(), edges.rename({"parent": "ancestor"})]
    )
    while True:  # add grandparents until nothing new appears (ontologies are shallow DAGs)
        extended = (
            closure.join(edges, left_on="ancestor", right_on="code")
            .select("code", ancestor="parent")
            .join(closure, on=["code", "ancestor"], how="anti")
            .unique()
        )
        if extended.is_empty():
            return closure
        closure = pl.concat([closure, extended])


def _entropy_score(fraction: float) -> float:
    return fraction * math.log(fraction) + (1 - fraction) * math.log(1 - fraction)


def select_tasks(
    dataset: MEDSDataset,
    k: int,
    *,
    min_event_fraction: float = 1 / 1000,
    expand_parents: bool = False,
    exclude_prefixes: tuple[str, ...] = (),
) -> pl.DataFrame:
    """Pick K time-to-event pretraining tasks by MOTOR's conditional-entropy criterion.

    Args:
        dataset: the MEDS dataset.
        k: number of tasks wanted (fewer come back when fewer codes qualify).
        min_event_fraction: femr's `min_fraction`: codes scoring above the entropy of a
            Bernoulli(min_event_fraction) are dropped.
        expand_parents: count each code also under its `parent_codes` ancestors from
            codes.parquet, so ancestors become candidate tasks (labels must then be built
            with `expand_parents=True` too).
        exclude_prefixes: codes starting with any of these are never tasks.

    Returns:
        DataFrame (code, subject_fraction, baseline, score), best task first.
    """
    if k < 1:
        raise TaskSpecError(dataset.root, f"number of tasks must be >= 1, got {k}")
    if not 0 < min_event_fraction < 0.5:
        raise TaskSpecError(dataset.root, f"min_event_fraction must be in (0, 0.5), got {min_event_fraction}")
    timed = dataset.events(columns=("subject_id", "time", "code")).filter(pl.col("time").is_not_null())
    num_subjects = timed.select(pl.col("subject_id").n_unique()).collect().item()
    if num_subjects == 0:
        raise TaskSpecError(dataset.root, "has no timed events to select tasks from")
    pairs = timed.select("subject_id", "code").unique()
    if expand_parents:
        ancestors = code_ancestors(dataset).lazy()
        pairs = (
            pairs.join(ancestors, on="code", how="left")
            .select("subject_id", code=pl.coalesce("ancestor", "code"))
            .unique()
        )
    fractions = (
        pairs.group_by("code").agg(subject_fraction=pl.len() / num_subjects).collect(engine="streaming")
    )
    if expand_parents:
        parents = (
            dataset.codes().select("code", parent="parent_codes").explode("parent").drop_nulls().collect()
        )
        baseline = (
            parents.join(fractions.rename({"code": "parent", "subject_fraction": "p"}), on="parent")
            .group_by("code")
            .agg(baseline=pl.col("p").min())
        )
        fractions = fractions.join(baseline, on="code", how="left")
        fractions = fractions.with_columns(baseline=pl.min_horizontal(pl.col("baseline").fill_null(1.0), 1.0))
    else:
        fractions = fractions.with_columns(baseline=pl.lit(1.0))
    w = pl.min_horizontal(pl.col("subject_fraction") / pl.col("baseline"), 1.0)
    scored = fractions.with_columns(w=w).filter((pl.col("w") > 0) & (pl.col("w") < 1))
    scored = scored.with_columns(
        score=pl.col("baseline")
        * (pl.col("w") * pl.col("w").log() + (1 - pl.col("w")) * (1 - pl.col("w")).log())
    )
    for prefix in exclude_prefixes:
        scored = scored.filter(~pl.col("code").str.starts_with(prefix))
    selected = (
        scored.filter(pl.col("score") <= _entropy_score(min_event_fraction))
        .sort(["score", "code"])
        .head(k)
        .select("code", "subject_fraction", "baseline", "score")
    )
    if selected.height < k:
        logger.warning("select_tasks: only %d of %d requested tasks qualify", selected.height, k)
    return selected


def load_phenotypes(path: str | Path) -> dict[str, list[str]]:
    """Read a phenotype mapping (YAML or JSON): group name -> list of code prefixes.

    Example (conf/ehr/phenotypes_example.yaml): `hypertension: ["DIAGNOSIS//ICD//10//I10", ...]`.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise TaskSpecError(path, f"cannot be read as a phenotype mapping ({error})") from error
    return validate_phenotypes(raw, source=path)


def validate_phenotypes(mapping: Mapping, source: str | Path = "<phenotypes>") -> dict[str, list[str]]:
    """Check a group -> prefixes mapping and return it as a plain dict (group order kept)."""
    if not isinstance(mapping, Mapping) or not mapping:
        raise TaskSpecError(
            source, "phenotype mapping must be a non-empty mapping of group -> list of code prefixes"
        )
    result: dict[str, list[str]] = {}
    for group, prefixes in mapping.items():
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        if (
            not isinstance(prefixes, list)
            or not prefixes
            or not all(isinstance(p, str) and p for p in prefixes)
        ):
            raise TaskSpecError(source, f"group {group!r} must list one or more non-empty code prefixes")
        result[str(group)] = list(prefixes)
    return result


def phenotype_codes(codes: pl.Series, phenotypes: Mapping[str, list[str]]) -> pl.DataFrame:
    """(code, group) pairs for every code in `codes` starting with one of a group's prefixes.

    `group` is the group's position in `phenotypes` (u32), the column index of the multi-hot.
    """
    prefixes = pl.DataFrame(
        [(index, prefix) for index, group in enumerate(phenotypes.values()) for prefix in group],
        schema={"group": pl.UInt32, "prefix": pl.String},
        orient="row",
    )
    unique = pl.DataFrame({"code": codes.unique()}).lazy()
    return (
        unique.join(prefixes.lazy(), how="cross")
        .filter(pl.col("code").str.starts_with(pl.col("prefix")))
        .select("code", "group")
        .unique()
        .collect()
    )
