"""Merlin's abdominal CT release (Stanford AIMI): volumes, report findings, zero-shot labels, splits.

Layout, as the publishers document it (github.com/StanfordMIMI/Merlin, documentation/download.md)::

    merlinabdominalctdataset/
        merlin_data/<study id>.nii.gz        25,494 abdominal CTs (download.md says .nii; damo-radar's
                                             samples from it are AC4214dbd.nii.gz, ...: both are read)
        reports_final.xlsx                   study id, Findings, Split, Few Shot
        zero_shot_findings_disease_cls.csv   study id + one column per finding: 1 positive,
                                             0 negated, -1 not mentioned
        five_years_disease_task.csv          six diseases' five-year labels for part of the test set,
                                             `merlin_split`: that task's own split
        metadata.csv                         age, gender, race, phase, manufacturer,
                                             manufacturermodelname, kvp, slicethickness, ...

What is verified and what is not. download.md names the files, the 1/0/-1 coding, `merlin_split`
and the metadata fields. It does not print the column headers; those come from code that reads
the real files:
- reports_final.xlsx: `study id`, `Findings`, `Split`, `Few Shot` are the columns read by
  alibaba-damo-academy/damo-radar ckpt/transform_report_to_json.py. Its Findings text holds the
  impression as well, after an `IMPRESSION:` marker. That script splits it there, and so does this
  adapter. The split values `train` and `test` are read there too. How the validation split is
  spelled is not published (download.md says "validation"), so `val`, `valid` and `validation`
  are all accepted.
- The CSVs' id column `study_id` and the 30 finding names come from third-party code only (a
  Merlin label pipeline's config and a finding list that says it matches the CSV's columns);
  damo-radar's transform_label_to_json.py takes the first column as the id and all others as
  findings. Where the publisher's column names are unverified, a header that differs only in
  case, spaces or underscores ("study id" vs "study_id") is accepted and noted. Otherwise the
  error names the column expected and the nearest one the file has. Every column besides the id
  whose values are all 1/0/-1 becomes a label; any other column is left out, with a note.
- five_years_disease_task.csv: only `merlin_split` is documented (the six diseases' column names
  and coding are not). Its binary-coded (1/0/-1) columns are written as
  OUT/five_year_labels.parquet, with that task's split as `split` and in
  OUT/five_year_splits.json. Any other columns are named in a note.

Phecode labels are not in the public release. The model's 1,692 phenotype outputs are named in
documentation/phenotypes.csv, but no per-study phecode table ships, so this adapter writes none.

One study per volume. No patient id is published, so each study is its own patient. Use the
official split (splits.json), not a random patient-level one. The volumes hold HU with their
orientation in the header (Merlin's own loader, merlin/data/monai_transforms.py, reorients them to
RAS and clips -1000..1000 with no rescale), so `fm3d prepare` reads them in place. A study id
listed twice in reports_final.xlsx (a preliminary and a final read of one exam, per a third-party
audit) keeps its longest text, and a note names it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from pathlib import Path

import polars as pl

from fm3d.data import atomic
from fm3d.data.journal import INDEX_SCHEMA
from fm3d.data.public.files import check_columns, nifti_stem, read_text_table
from fm3d.data.public.registry import (
    DatasetAdapter,
    DatasetLayoutError,
    DatasetTables,
    LayoutReport,
    describe_folder,
    listing,
    register_dataset,
    require_file,
)

RELEASE_DIR = "merlinabdominalctdataset"
VOLUMES_DIR = "merlin_data"
REPORTS_FILE = "reports_final.xlsx"
ZERO_SHOT_FILE = "zero_shot_findings_disease_cls.csv"
FIVE_YEAR_FILE = "five_years_disease_task.csv"
METADATA_FILE = "metadata.csv"
# reports_final.xlsx columns (damo-radar ckpt/transform_report_to_json.py).
REPORT_ID, REPORT_TEXT, REPORT_SPLIT, REPORT_FEW_SHOT = "study id", "Findings", "Split", "Few Shot"
# The CSVs' id column: third-party code only (see the module docstring).
CSV_ID = "study_id"
FIVE_YEAR_SPLIT = "merlin_split"
IMPRESSION_MARKER = "IMPRESSION:"
# Publisher split value (lower case) -> fm3d split.
SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
FLAG_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# The 30 zero-shot findings, as third-party code lists the CSV's columns; only checked, never required.
ZERO_SHOT_FINDINGS: tuple[str, ...] = (
    "submucosal_edema", "renal_hypodensities", "aortic_valve_calcification", "coronary_calcification",
    "thrombosis", "metastatic_disease", "pancreatic_atrophy", "renal_cyst", "osteopenia",
    "surgically_absent_gallbladder", "atelectasis", "abdominal_aortic_aneurysm", "anasarca",
    "hiatal_hernia", "lymphadenopathy", "prostatomegaly", "biliary_ductal_dilation", "cardiomegaly",
    "splenomegaly", "hepatomegaly", "atherosclerosis", "ascites", "pleural_effusion",
    "hepatic_steatosis", "appendicitis", "gallstones", "hydronephrosis", "bowel_obstruction",
    "free_air", "fracture",
)  # fmt: skip
FIVE_YEAR_LABELS_FILE = "five_year_labels.parquet"
FIVE_YEAR_SPLITS_FILE = "five_year_splits.json"
_MANIFEST_SCHEMA = {
    "study_id": pl.String,
    "patient_id": pl.String,
    "image_path": pl.String,
    "split": pl.String,
    "few_shot": pl.Boolean,
    "findings": pl.String,
    "impression": pl.String,
}


@register_dataset("merlin")
class Merlin(DatasetAdapter):
    """Merlin abdominal CT: volumes, findings text, the zero-shot finding labels and the official split."""

    title = "Merlin: 25,494 abdominal CTs (Stanford ED) with report findings"
    writes = (
        "manifest (+ metadata.csv columns), reports (findings, impression), labels (zero-shot findings), "
        "splits, five_year_labels.parquet"
    )
    source = (
        "https://stanfordaimi.azurewebsites.net/datasets/60b9c7ff-877b-48ce-96c3-0194c8205c40 "
        "(data use agreement, then azcopy)"
    )
    licence = "Stanford AIMI data use agreement: personal, non-commercial research use only"

    def read(self, root: Path, out: Path, splits: Collection[str] | None = None) -> DatasetTables:
        release = root / RELEASE_DIR if (root / RELEASE_DIR).is_dir() else root
        volumes_dir = release / VOLUMES_DIR
        if not volumes_dir.is_dir():
            raise DatasetLayoutError(
                volumes_dir,
                f"is missing, so {release} does not look like Merlin's release (expected merlin_data/ "
                f"beside {REPORTS_FILE}; found {describe_folder(release)})",
                f"pass the {RELEASE_DIR} folder azcopy made (or the folder holding it) as --root",
            )
        expected = f"{REPORTS_FILE} beside merlin_data/ and {ZERO_SHOT_FILE}"
        reports_path = require_file(release, REPORTS_FILE, "Merlin's release", expected)
        layout = LayoutReport()
        reports = _reports(reports_path, layout)
        volumes = _volumes(volumes_dir, set(reports["study_id"]), layout)
        rows = []
        for study in reports.iter_rows(named=True):
            study_id = study["study_id"]
            split = layout.split_of(study_id, study["split"], SPLITS, splits, REPORT_SPLIT)
            if split is None:
                continue
            if study_id not in volumes:
                layout.add_missing("volume", f"{VOLUMES_DIR}/{study_id}.nii.gz")
                continue
            path = str(volumes[study_id].resolve())
            rows.append({**study, "patient_id": study_id, "image_path": path, "split": split})
        manifest = pl.DataFrame(rows, schema=_MANIFEST_SCHEMA)
        manifest = _with_metadata(manifest, release / METADATA_FILE, layout)
        ids = manifest.select("study_id")
        labels = _zero_shot(release / ZERO_SHOT_FILE, layout)
        _write_five_year(release / FIVE_YEAR_FILE, ids, out, layout)
        return DatasetTables(
            manifest=manifest,
            reports=manifest.select("study_id", "findings", "impression"),
            labels=None if labels is None else ids.join(labels, "study_id", "inner", maintain_order="left"),
            layout=layout,
        )


def _reports(path: Path, layout: LayoutReport) -> pl.DataFrame:
    """reports_final.xlsx as study_id, findings, impression, split, few_shot; one row per study."""
    table = _read_excel(path)
    header = table.columns
    id_col, text_col, split_col = (
        _column(path, header, name, layout) for name in (REPORT_ID, REPORT_TEXT, REPORT_SPLIT)
    )
    # The few-shot flag is not needed to read the data, so a release without it is read, with a note.
    flag_col = next((name for name in header if _folded(name) == _folded(REPORT_FEW_SHOT)), None)
    if flag_col is None:
        layout.notes.append(f"{REPORTS_FILE}: no column {REPORT_FEW_SHOT!r}, so few_shot is unknown")
    flag = (
        pl.lit(None, pl.String) if flag_col is None else pl.col(flag_col).str.strip_chars().str.to_lowercase()
    )
    table = table.select(
        pl.col(id_col).str.strip_chars().alias("study_id"),
        pl.col(text_col).fill_null("").alias("text"),
        pl.col(split_col).alias("split"),
        flag.alias("flag"),
    ).filter(pl.col("study_id").is_not_null() & (pl.col("study_id") != ""))
    repeated = table.filter(pl.col("study_id").is_duplicated())["study_id"].unique(maintain_order=True)
    if len(repeated):
        listed = listing(repeated.to_list())
        layout.notes.append(
            f"{REPORTS_FILE}: study ids listed more than once, the longest text kept: {listed}"
        )
    table = (
        table.with_row_index("row")
        .sort(pl.col("text").str.len_chars(), "row", descending=[True, False])
        .unique("study_id", keep="first")
        .sort("row")
    )
    odd = table.filter(pl.col("flag").is_not_null() & ~pl.col("flag").is_in(list(FLAG_VALUES)))
    if odd.height:
        layout.notes.append(
            f"{REPORTS_FILE}: {REPORT_FEW_SHOT!r} values other than true/false/1/0/yes/no read as unknown: "
            f"{listing(odd['flag'].unique(maintain_order=True).to_list())}"
        )
    marker = pl.col("text").str.find(IMPRESSION_MARKER, literal=True)
    return table.select(
        "study_id",
        pl.col("flag").replace_strict(FLAG_VALUES, default=None, return_dtype=pl.Boolean).alias("few_shot"),
        _blank_to_null(
            pl.when(marker.is_null()).then("text").otherwise(pl.col("text").str.slice(0, marker))
        ).alias("findings"),
        _blank_to_null(pl.col("text").str.slice(marker + len(IMPRESSION_MARKER))).alias("impression"),
        "split",
    )


def _blank_to_null(text: pl.Expr) -> pl.Expr:
    stripped = text.str.strip_chars()
    return pl.when(stripped == "").then(None).otherwise(stripped)


def _read_excel(path: Path) -> pl.DataFrame:
    """The workbook's first sheet, every cell as text (an id must not turn into a number)."""
    try:
        return pl.read_excel(path, engine="calamine", infer_schema_length=0)
    except ImportError as exc:
        raise DatasetLayoutError(
            path, f"cannot be read: .xlsx needs the fastexcel package ({exc})", "pip install fastexcel"
        ) from exc
    except Exception as exc:  # calamine raises its own types for a damaged or non-xlsx file
        raise DatasetLayoutError(
            path, f"cannot be read as an Excel workbook ({type(exc).__name__}: {exc})", "re-download it"
        ) from exc


def _column(path: Path, header: Sequence[str], expected: str, layout: LayoutReport) -> str:
    """The column named `expected`, or one differing only in case, spaces or underscores (noted).

    Otherwise a `DatasetLayoutError` naming `expected` and the nearest column the file has.
    """
    if expected in header:
        return expected
    found = [name for name in header if _folded(name) == _folded(expected)]
    if found:
        layout.notes.append(f"{path.name}: no column {expected!r}; read {found[0]!r} as it")
        return found[0]
    check_columns(path, header, [expected])  # raises, naming the nearest column: `expected` is absent
    return expected


def _folded(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _volumes(folder: Path, listed: set[str], layout: LayoutReport) -> dict[str, Path]:
    """study id -> its volume in merlin_data/ (at any depth); files no study lists are unexpected."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        study_id = nifti_stem(path.name)
        is_volume = study_id != path.name and study_id in listed
        if is_volume and study_id not in found:
            found[study_id] = path
        else:
            layout.unexpected.append(path.relative_to(folder.parent).as_posix())
    return found


def _with_metadata(manifest: pl.DataFrame, path: Path, layout: LayoutReport) -> pl.DataFrame:
    """The manifest with metadata.csv's columns joined on (ones fm3d writes itself are left out)."""
    if not path.is_file():
        layout.add_missing("table", METADATA_FILE)
        return manifest
    table = _by_study(path, layout)
    taken = set(manifest.columns) | set(INDEX_SCHEMA)
    clashing = [c for c in table.columns if c in taken and c != "study_id"]
    if clashing:
        layout.notes.append(f"{METADATA_FILE}: columns left out, fm3d writes its own: {', '.join(clashing)}")
    return manifest.join(table.drop(clashing), "study_id", "left", maintain_order="left")


def _by_study(path: Path, layout: LayoutReport) -> pl.DataFrame:
    """A CSV as text keyed by `study_id` (its id column renamed), one row per study (first kept)."""
    table = read_text_table(path, [])
    table = table.rename({_column(path, table.columns, CSV_ID, layout): "study_id"})
    table = table.with_columns(pl.col("study_id").str.strip_chars())
    repeated = table.height - table["study_id"].n_unique()
    if repeated:
        layout.notes.append(f"{path.name}: {repeated} repeated study id rows, the first of each kept")
    return table.unique("study_id", keep="first", maintain_order=True)


def _tristate(path: Path, table: pl.DataFrame, columns: Sequence[str], layout: LayoutReport) -> pl.DataFrame:
    """study_id + each 1/0/-1 column as True/False/null; columns holding other values are noted, not read."""
    kept = []
    for name in columns:
        text = pl.col(name).str.strip_chars()
        number = text.cast(pl.Float64, strict=False)
        coded = text.is_null() | (text == "") | number.is_in([1.0, 0.0, -1.0]).fill_null(False)
        odd = table.filter(~coded)[name].unique(maintain_order=True).to_list()
        if odd:
            layout.notes.append(
                f"{path.name}: column {name!r} is not coded 1/0/-1 (values: {listing(odd)}); not read"
            )
            continue
        kept.append(pl.when(number == 1.0).then(True).when(number == 0.0).then(False).alias(name))
    return table.select("study_id", *kept)


def _zero_shot(path: Path, layout: LayoutReport) -> pl.DataFrame | None:
    """The zero-shot findings as booleans: 1 -> True, 0 -> False, -1 (not mentioned) -> null."""
    if not path.is_file():
        layout.add_missing("table", ZERO_SHOT_FILE)
        return None
    table = _by_study(path, layout)
    findings = [c for c in table.columns if c != "study_id"]
    absent = [name for name in ZERO_SHOT_FINDINGS if name not in findings]
    if absent:
        layout.notes.append(f"{ZERO_SHOT_FILE}: of the 30 findings expected, absent: {listing(absent)}")
    return _tristate(path, table, findings, layout)


def _write_five_year(path: Path, ids: pl.DataFrame, out: Path, layout: LayoutReport) -> None:
    """OUT/five_year_labels.parquet and OUT/five_year_splits.json from the five-year disease task.

    The task has its own split (merlin_split) over part of the test set, so it is written beside
    the main tables rather than merged into them.
    """
    for stale in (FIVE_YEAR_LABELS_FILE, FIVE_YEAR_SPLITS_FILE):  # an earlier run's, for other studies
        (out / stale).unlink(missing_ok=True)
    if not path.is_file():
        layout.add_missing("table", FIVE_YEAR_FILE)
        return
    table = _by_study(path, layout)
    split_col = _column(path, table.columns, FIVE_YEAR_SPLIT, layout)
    labels = _tristate(path, table, [c for c in table.columns if c not in ("study_id", split_col)], layout)
    if labels.width == 1:
        layout.notes.append(f"{FIVE_YEAR_FILE}: no column coded 1/0/-1, so no five-year labels written")
        return
    split = table[split_col].str.strip_chars().str.to_lowercase()
    odd = split.filter(split.is_not_null() & ~split.is_in(list(SPLITS))).unique(maintain_order=True)
    if len(odd):
        layout.notes.append(
            f"{FIVE_YEAR_FILE}: {split_col} values read as no split: {listing(odd.to_list())}"
        )
    labels = labels.insert_column(1, split.replace_strict(SPLITS, default=None).alias("split"))
    labels = ids.join(labels, "study_id", "inner", maintain_order="left")
    if labels.is_empty():
        layout.notes.append(f"{FIVE_YEAR_FILE}: none of its studies is in the manifest, so nothing written")
        return
    atomic.write_parquet(out / FIVE_YEAR_LABELS_FILE, labels)
    groups = {
        name: labels.filter(pl.col("split") == name)["study_id"].to_list()
        for name in dict.fromkeys(SPLITS.values())
    }
    atomic.write_json(out / FIVE_YEAR_SPLITS_FILE, {name: ids for name, ids in groups.items() if ids})
    layout.notes.append(
        f"wrote {out / FIVE_YEAR_LABELS_FILE} ({labels.height} studies, {labels.width - 2} diseases) "
        f"and {out / FIVE_YEAR_SPLITS_FILE} (the task's own split)"
    )
