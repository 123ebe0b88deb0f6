"""`fm3d prepare` on real CTs: outputs, failures, resuming, workers, and a SIGKILL mid-run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pydicom
import pytest

from fm3d.data.cache import PreparedCache
from fm3d.data.io import read_label, read_volume
from fm3d.data.prepare import main, prepare_cache
from fm3d.data.preprocess import invert_preprocessing, preprocess
from fm3d.spec import InputSpec


@pytest.fixture
def raw(shared_data: Path, tmp_path: Path) -> Path:
    """A folder of raw studies (copies of the real files) beside which manifests are written."""
    root = tmp_path / "raw"
    root.mkdir()
    ts = shared_data / "ct" / "totalsegmentator"
    shutil.copy(ts / "example_ct_sm.nii.gz", root / "ct.nii.gz")
    shutil.copy(ts / "example_seg.nii.gz", root / "seg.nii.gz")
    shutil.copytree(shared_data / "ct" / "dcmqi_ct3slice", root / "dicom")
    data = (ts / "example_ct_sm.nii.gz").read_bytes()
    (root / "broken.nii.gz").write_bytes(data[: len(data) // 3])
    return root


def _manifest(raw: Path) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "study_id": ["ts", "ts_nolabel", "ge", "broken", "gone"],
            "patient_id": ["p1", "p1", "p2", "p3", "p4"],
            "image_path": ["ct.nii.gz", "ct.nii.gz", "dicom", "broken.nii.gz", "missing.nii.gz"],
            "label_path": ["seg.nii.gz", None, "dicom/liver_spine_seg.nrrd", None, None],
            "report": ["Liver normal.", None, "Three slices.", "x", "y"],
            "study_time": ["2020-01-01", "2020-02-01", "2021-01-01", "2022-01-01", "2023-01-01"],
        }
    )


def test_prepare_real_studies(raw: Path, tmp_path: Path, capsys) -> None:
    _manifest(raw).write_csv(raw / "manifest.csv")
    out = tmp_path / "cache"
    assert main(["--manifest", str(raw / "manifest.csv"), "--out", str(out), "--no-progress"]) == 1
    printed = capsys.readouterr()
    assert "3 prepared, 0 skipped (up to date), 2 failed" in printed.out
    assert f"2 studies failed; see {out / 'failures.parquet'}" in printed.err

    index = pl.read_parquet(out / "index.parquet")
    assert index["study_id"].to_list() == ["ts", "ts_nolabel", "ge", "broken", "gone"]
    assert index["status"].to_list() == ["ok", "ok", "ok", "failed", "failed"]
    assert {"report", "study_time"} <= set(index.columns)
    failures = pl.read_parquet(out / "failures.parquet")
    assert failures.columns == ["study_id", "source", "error"]
    errors = dict(zip(failures["study_id"], failures["error"], strict=True))
    assert "broken.nii.gz: is truncated or corrupt" in errors["broken"]
    assert "missing.nii.gz: does not exist" in errors["gone"]

    cache = PreparedCache(out)
    assert cache.study_ids == ["ts", "ts_nolabel", "ge"]
    assert cache.row("ts")["report"] == "Liver normal." and cache.row("ge")["patient_id"] == "p2"
    volume, label = read_volume(raw / "ct.nii.gz"), read_label(raw / "seg.nii.gz")
    expected = preprocess(volume, InputSpec(), label=label)
    image = cache.image("ts")
    assert isinstance(image, np.memmap) and image.dtype == np.int16
    np.testing.assert_array_equal(image, expected.image)
    np.testing.assert_array_equal(cache.label("ts"), expected.label)
    assert cache.label("ts_nolabel") is None
    np.testing.assert_allclose(cache.affine("ts"), expected.affine)
    assert cache.spacing("ts") == pytest.approx(expected.spacing)
    row = cache.row("ts")
    np.testing.assert_allclose(
        [row["hu_p1"], row["hu_p50"], row["hu_p99"]], np.percentile(image, [1, 50, 99])
    )
    assert row["source_path"] == str((raw / "ct.nii.gz").resolve())
    assert row["source_hash"] == hashlib.blake2b((raw / "ct.nii.gz").read_bytes(), digest_size=16).hexdigest()
    assert json.loads(row["settings"])["target_spacing_mm"] == [3.0, 1.5, 1.5]
    for organ in (5, 1, 52):  # liver, spleen, aorta: same anatomy after `fm3d prepare`
        before = volume.array[label.array == organ].mean()
        after = np.asarray(image)[np.asarray(cache.label("ts")) == organ].mean()
        assert abs(before - after) < 5.0, (organ, before, after)
    back = invert_preprocessing(np.asarray(cache.label("ts")), cache.record("ts"), is_label=True)
    assert (back == label.array).mean() > 0.97
    # The DICOM series and its NRRD label line up in the cache too.
    ge_liver = np.asarray(cache.image("ge"))[np.asarray(cache.label("ge")) == 1].mean()
    assert 0 < ge_liver < 100
    assert not list(out.rglob("*.tmp-*")) and not list((out / ".journal").iterdir())


def test_rerun_skips_unchanged_and_redoes_changed(raw: Path, tmp_path: Path, capsys) -> None:
    manifest = raw / "manifest.parquet"
    _manifest(raw).filter(pl.col("study_id").is_in(["ts", "ts_nolabel", "broken"])).write_parquet(manifest)
    out = tmp_path / "cache"
    args = ["--manifest", str(manifest), "--out", str(out), "--no-progress"]
    main(args)
    capsys.readouterr()
    first_mtime = (out / "studies" / "ts.npy").stat().st_mtime_ns

    main(args)
    assert "0 prepared, 2 skipped (up to date), 1 failed" in capsys.readouterr().out
    assert (out / "studies" / "ts.npy").stat().st_mtime_ns == first_mtime

    # Manifest-only changes (patient_id, report columns) reach the index without re-preparing.
    relabelled = pl.read_parquet(manifest).with_columns(
        pl.lit("p9").alias("patient_id"), pl.lit("new").alias("report")
    )
    relabelled.write_parquet(manifest)
    main(args)
    assert "0 prepared, 2 skipped" in capsys.readouterr().out
    assert (
        PreparedCache(out).row("ts")["patient_id"] == "p9" and PreparedCache(out).row("ts")["report"] == "new"
    )

    # Same bytes but a new modification time: hashed again, found unchanged, still skipped.
    os.utime(raw / "seg.nii.gz")
    main(args)
    assert "0 prepared, 2 skipped" in capsys.readouterr().out

    # A changed label re-prepares only the study that uses it.
    seg = read_label(raw / "seg.nii.gz")
    nib.save(nib.Nifti1Image((seg.array > 0).astype(np.uint8), seg.affine), raw / "seg.nii.gz")
    main(args)
    assert "1 prepared, 1 skipped" in capsys.readouterr().out
    assert set(np.unique(PreparedCache(out).label("ts"))) == {0, 1}

    # New settings re-prepare everything.
    main([*args, "--spacing", "3", "3", "3"])
    assert "2 prepared, 0 skipped" in capsys.readouterr().out
    assert PreparedCache(out).shape("ts") == (30, 101, 122)


def test_two_workers_match_one(raw: Path, tmp_path: Path) -> None:
    manifest = raw / "manifest.csv"
    _manifest(raw).write_csv(manifest)
    one = prepare_cache(manifest, tmp_path / "one", workers=1, progress=False)
    two = prepare_cache(manifest, tmp_path / "two", workers=2, progress=False)
    assert one == two == {"prepared": 3, "skipped": 0, "failed": 2}
    a, b = PreparedCache(tmp_path / "one"), PreparedCache(tmp_path / "two")
    assert a.study_ids == b.study_ids
    for sid in a.study_ids:
        np.testing.assert_array_equal(a.image(sid), b.image(sid))
    drop = ["source_stat", "output_stat"]  # sizes and mtimes of the files each run wrote
    assert a.index.drop(drop).equals(b.index.drop(drop))


def test_series_uid_column_picks_a_series(raw: Path, tmp_path: Path) -> None:
    first = raw / "dicom" / "01.dcm"
    ds = pydicom.dcmread(first)
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.save_as(first)
    keep = pydicom.dcmread(raw / "dicom" / "02.dcm").SeriesInstanceUID
    manifest = raw / "m.csv"
    pl.DataFrame(
        {"study_id": ["a", "b"], "image_path": ["dicom", "dicom"], "series": [keep, None]}
    ).write_csv(manifest)
    counts = prepare_cache(manifest, tmp_path / "c", series_uid_column="series", progress=False)
    assert counts == {"prepared": 1, "skipped": 0, "failed": 1}
    failures = pl.read_parquet(tmp_path / "c" / "failures.parquet")
    assert "holds 2 series" in failures["error"][0] and keep in failures["error"][0]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pl.DataFrame({"study_id": ["a"], "path": ["x"]}), r"lacks the required columns \['image_path'\]"),
        (
            pl.DataFrame({"study_id": ["a", "a"], "image_path": ["x", "y"]}),
            r"lists study_ids more than once: \['a'\]",
        ),
        (
            pl.DataFrame({"study_id": ["../a"], "image_path": ["x"]}),
            r"has 1 study_ids that cannot name a file: data row 1 \('\.\./a'\): holds a slash",
        ),
        (
            pl.DataFrame({"study_id": ["a"], "image_path": ["x"], "status": ["new"]}),
            r"has columns \['status'\]",
        ),
    ],
)
def test_bad_manifests(tmp_path: Path, capsys, frame: pl.DataFrame, message: str) -> None:
    frame.write_csv(tmp_path / "m.csv")
    assert main(["--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "m.csv" in err
    assert re.search(message, err), err


def test_numeric_looking_ids_stay_text(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("study_id,patient_id,image_path\n007,0042,none.nii.gz\n")
    prepare_cache(tmp_path / "m.csv", tmp_path / "c", progress=False)
    index = pl.read_parquet(tmp_path / "c" / "index.parquet")
    assert index.select("study_id", "patient_id", "status").row(0) == ("007", "0042", "failed")


def test_killed_run_resumes_with_every_study_once(shared_data: Path, tmp_path: Path) -> None:
    """SIGKILL a real `fm3d prepare` process midway, re-run it, and check nothing is lost or repeated."""
    source = shared_data / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz"
    n = 8
    ids = [f"s{i:02d}" for i in range(n)]
    pl.DataFrame({"study_id": ids, "image_path": [str(source)] * n}).write_csv(tmp_path / "m.csv")
    out = tmp_path / "cache"
    command = [sys.executable, "-m", "fm3d.cli", "prepare", "--manifest", str(tmp_path / "m.csv"),
               "--out", str(out), "--spacing", "1.5", "1.0", "1.0", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = out / ".journal"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if journal.is_dir() and len(list(journal.glob("*.json"))) >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = sorted(p.stem for p in journal.glob("*.json"))
    assert 2 <= len(done_before) < n, "the run should have been killed midway"
    assert not (out / "index.parquet").exists()
    mtimes = {sid: (out / "studies" / f"{sid}.npy").stat().st_mtime_ns for sid in done_before}
    (out / "studies" / ".s07.npy.tmp-99999").write_bytes(b"half a study")  # as a kill mid-write leaves

    rerun = subprocess.run(command, capture_output=True, text=True, check=True)
    assert (
        f"{n - len(done_before)} prepared, {len(done_before)} skipped (up to date), 0 failed" in rerun.stdout
    )
    for sid, mtime in mtimes.items():  # journaled studies were not prepared a second time
        assert (out / "studies" / f"{sid}.npy").stat().st_mtime_ns == mtime
    assert not list(out.rglob("*.tmp-*"))
    index = pl.read_parquet(out / "index.parquet")
    assert sorted(index["study_id"].to_list()) == ids and index["status"].unique().to_list() == ["ok"]
    assert sorted(p.stem for p in (out / "studies").glob("*.npy")) == ids
    cache = PreparedCache(out)
    reference = np.asarray(cache.image(ids[0]))
    for sid in ids:
        np.testing.assert_array_equal(cache.image(sid), reference)
