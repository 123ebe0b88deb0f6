"""Datasets in the Medical Segmentation Decathlon's `dataset.json` layout: any MSD CT task, and AMOS.

Layout (MSD: medicaldecathlon.com, Simpson et al. 2019; AMOS 2022 ships the same schema in
amos22.zip, zenodo.org/records/7262581, with a validation list added)::

    dataset.json    {"name", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", ...},
                     "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...],
                     "validation": [...] (AMOS), "test": ["./imagesTs/y.nii.gz", ...]}
    imagesTr/ labelsTr/ imagesTs/ (+ imagesVa/ labelsVa/ in AMOS)

One module, two registered names, because the two differ only in what they keep: an MSD task
must be CT (the MRI tasks are refused), while AMOS mixes 500 CT and 100 MRI scans in one list and
tells them apart only by id (amos_0001..0500 are CT, higher ids MRI; the MRI-only AbdomenMR sets
built from AMOS start at amos_0507), so its MRI are left out by id. Labels go to the manifest's
label_path as shipped (`fm3d prepare` reads them), the label names to labels.json. Splits:
training -> train, validation -> val, test -> predict (test where a label is listed too). Neither
publishes patient ids, so each image is its own patient. MSD archives made on macOS carry
AppleDouble files (`._liver_0.nii.gz`) beside the images; like anything dataset.json does not
list, they are reported as unexpected and not read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any, ClassVar

import polars as pl

from fm3d.data.public.files import nifti_stem
from fm3d.data.public.registry import (
    DatasetAdapter,
    DatasetLayoutError,
    DatasetTables,
    LayoutReport,
    describe_folder,
    register_dataset,
)

DATASET_JSON = "dataset.json"
# dataset.json list -> fm3d split; test images without labels become "predict" (embedded, not scored).
LISTS = {"training": "train", "validation": "val", "test": "predict"}
IMAGE_FOLDERS = ("imagesTr", "labelsTr", "imagesVa", "labelsVa", "imagesTs", "labelsTs")
AMOS_LAST_CT_ID = 500
AMOS_ID = re.compile(r"^amos_(\d+)$")


class DecathlonLayout(DatasetAdapter):
    """Reads a folder holding dataset.json and the images and labels it lists."""

    dataset: ClassVar[str] = ""

    def keep(self, study_id: str, spec: dict[str, Any], layout: LayoutReport) -> bool:
        """Whether a listed image is read (all, unless a subclass leaves some out)."""
        return True

    def check(self, path: Path, spec: dict[str, Any]) -> None:
        """Refuse a dataset.json this adapter cannot read (none, unless a subclass says so)."""

    def read(self, root: Path, out: Path, splits: Collection[str] | None = None) -> DatasetTables:
        spec = _dataset_json(root, self.dataset)
        self.check(root / DATASET_JSON, spec)
        layout = LayoutReport()
        rows, listed = [], set()
        for key in LISTS:
            for entry in spec.get(key) or []:
                image, label = (
                    (entry, None) if isinstance(entry, str) else (entry.get("image"), entry.get("label"))
                )
                if not isinstance(image, str):
                    raise DatasetLayoutError(
                        root / DATASET_JSON, f"has a {key!r} entry without an image path: {entry!r}",
                        "re-download the dataset; this file is not as published",
                    )  # fmt: skip
                files = [f for f in (image, label) if f]
                listed.update(_normal(f) for f in files)
                study_id = nifti_stem(Path(image).name)
                split = "test" if key == "test" and label else LISTS[key]
                if not self.keep(study_id, spec, layout):
                    continue
                if splits is not None and split not in splits:
                    layout.add_skipped("split not in --split", study_id)
                    continue
                absent = [f for f in files if not (root / f).is_file()]
                if absent:
                    for name in absent:
                        layout.add_missing("image" if name == image else "label map", _normal(name))
                    continue
                rows.append({
                    "study_id": study_id,
                    "patient_id": study_id,
                    "image_path": str((root / image).resolve()),
                    "label_path": str((root / label).resolve()) if label else None,
                    "split": split,
                })  # fmt: skip
        for folder in IMAGE_FOLDERS:
            if (root / folder).is_dir():
                layout.unexpected += sorted(
                    f"{folder}/{p.name}"
                    for p in (root / folder).iterdir()
                    if f"{folder}/{p.name}" not in listed
                )
        names = {str(k): str(v) for k, v in (spec.get("labels") or {}).items() if str(k) != "0"}
        manifest = pl.DataFrame(
            rows,
            schema={c: pl.String for c in ("study_id", "patient_id", "image_path", "label_path", "split")},
        )
        return DatasetTables(manifest=manifest, label_names=names or None, layout=layout)


def _normal(path: str) -> str:
    """A dataset.json path as a folder-relative name: "./imagesTr/x.nii.gz" -> "imagesTr/x.nii.gz"."""
    return Path(path).as_posix().removeprefix("./")


def _dataset_json(root: Path, dataset: str) -> dict[str, Any]:
    path = root / DATASET_JSON
    if not path.is_file():
        raise DatasetLayoutError(
            path,
            f"is missing, so {root} does not look like {dataset} (expected dataset.json beside imagesTr/ "
            f"and labelsTr/; found {describe_folder(root)})",
            f"pass the {dataset} folder holding dataset.json as --root",
        )
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetLayoutError(path, f"cannot be read as JSON ({exc})", "re-download the dataset") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("training"), list):
        raise DatasetLayoutError(
            path, "has no 'training' list of {image, label} entries", "this is not an MSD-style dataset.json"
        )
    return spec


@register_dataset("msd")
class DecathlonTask(DecathlonLayout):
    """One CT task of the Medical Segmentation Decathlon (Task03_Liver, Task09_Spleen, ...)."""

    dataset = "an MSD task"
    title = "Medical Segmentation Decathlon: one CT task folder (Task03_Liver, Task09_Spleen, ...)"
    writes = "manifest (image + label map per training case; test images as 'predict'), labels.json, splits"
    source = "http://medicaldecathlon.com (Task*.tar from its Google Drive / AWS links)"
    licence = "CC BY-SA 4.0"

    def check(self, path: Path, spec: dict[str, Any]) -> None:
        modality = {str(k): str(v) for k, v in (spec.get("modality") or {}).items()}
        if list(modality.values()) != ["CT"]:
            raise DatasetLayoutError(
                path,
                f"describes a task of modality {modality or 'unknown'}, not one CT channel",
                "fm3d reads CT in HU; use one of the CT tasks (Task03_Liver, Task06_Lung, Task07_Pancreas, "
                "Task08_HepaticVessel, Task09_Spleen, Task10_Colon)",
            )


@register_dataset("amos")
class Amos(DecathlonLayout):
    """AMOS 2022: the CT scans (ids up to 500) with their 15-organ label maps; MRI left out."""

    dataset = "AMOS 2022"
    title = "AMOS 2022: abdominal CT (and MRI, left out) with 15 organs segmented"
    writes = (
        "manifest (CT only; image + label map; test images as 'predict'), labels.json (15 organs), splits"
    )
    source = "https://zenodo.org/records/7262581 (amos22.zip)"
    licence = "CC BY 4.0"

    def keep(self, study_id: str, spec: dict[str, Any], layout: LayoutReport) -> bool:
        match = AMOS_ID.match(study_id)
        if match is None:
            layout.add_skipped("not an amos_NNNN id, so CT or MRI is unknown", study_id)
            return False
        if int(match.group(1)) > AMOS_LAST_CT_ID:
            layout.add_skipped(f"MRI (AMOS ids above {AMOS_LAST_CT_ID})", study_id)
            return False
        return True
