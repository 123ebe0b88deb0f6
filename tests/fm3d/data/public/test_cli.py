"""`fm3d datasets`: list, manifest, and user errors as one line on stderr with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

from fm3d.data.public.cli import main


def test_list_names_every_dataset_with_source_and_licence(capsys) -> None:
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    for name in ("amos:", "ct-rate:", "msd:", "totalsegmentator:"):
        assert name in printed
    assert "huggingface.co/datasets/ibrahimhamamci/CT-RATE" in printed
    assert printed.count("licence:") == printed.count("get it:") >= 4


def test_manifest_writes_tables_and_says_what_it_found(tmp_path: Path, tiny_ct, capsys) -> None:
    root = tmp_path / "Task09_Spleen"
    tiny_ct(root / "imagesTr" / "spleen_2.nii.gz")
    tiny_ct(root / "labelsTr" / "spleen_2.nii.gz")
    (root / "imagesTr" / "._spleen_2.nii.gz").write_bytes(b"\x00")
    spec = {
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"}],
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    assert main(["manifest", "msd", "--root", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "msd: 1 studies (train 1)" in printed
    assert "unexpected files (not read): 1 (imagesTr/._spleen_2.nii.gz)" in printed
    assert f"wrote {out / 'manifest.parquet'}" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "labels.json",
        "manifest.parquet",
        "splits.json",
        "summary.json",
    ]


def test_unknown_dataset_is_one_line_with_the_nearest_name(tmp_path: Path, capsys) -> None:
    assert main(["manifest", "ct_rate", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown dataset 'ct_rate' (did you mean 'ct-rate'?)" in err


def test_wrong_root_is_one_line_naming_the_missing_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "root").mkdir()
    assert (
        main(["manifest", "totalsegmentator", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("fm3d datasets: ") and "meta.csv: is missing" in err and "an empty root/" in err
