"""fm3d.text_cache: report embeddings on disk, invalidated per report, resumable, shardable, refused."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from fm3d.text import TextTower, init_text_model
from fm3d.text_cache import (
    PARTS_FOLDER,
    TextCacheError,
    TextEmbeddingCache,
    build_text_cache,
    text_key,
)

REPORTS = [
    "The liver is normal. No focal lesion.",
    "Small nodule in the right upper lobe. No effusion.",
    "Cardiomegaly. Bilateral pleural effusion.",
    "No acute findings.",
    "Mild emphysema in both upper lobes. Stable nodule.",
    "Hiatal hernia. Atelectasis at the left base.",
    "Kidneys normal. No hydronephrosis.",
    "Splenomegaly without focal lesion.",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("text_model")
    init_text_model(folder, REPORTS * 4, vocab_size=120, hidden_size=16, num_heads=2, max_length=32)
    return str(folder)


@pytest.fixture(scope="module")
def tower(model) -> TextTower:
    return TextTower(model, pooling="mean", max_length=32)


def _all_vectors(folder) -> dict[str, np.ndarray]:
    cache = TextEmbeddingCache(folder)
    rows, matrix = cache._rows
    return {key: matrix[row] for key, row in rows.items()}


def test_cached_vectors_equal_the_towers_embeddings(tower, tmp_path):
    texts = [*REPORTS, "", REPORTS[0]]  # an empty report and a duplicate
    stats = build_text_cache(tower, texts, tmp_path / "cache", batch_size=3, progress=False)
    assert (stats.embedded, stats.reused, stats.skipped_empty) == (len(REPORTS), 0, 1)

    cache = TextEmbeddingCache(tmp_path / "cache")
    assert len(cache) == len(REPORTS) and cache.dim == 16
    vectors = cache.vectors(texts)
    np.testing.assert_allclose(vectors[: len(REPORTS)], tower.embed(REPORTS).numpy(), atol=1e-6)
    np.testing.assert_array_equal(vectors[len(REPORTS)], np.zeros(16, np.float32))
    np.testing.assert_array_equal(vectors[-1], vectors[0])
    # The key is the text as the tower sees it: whitespace does not make another report.
    assert cache.key("  The liver is normal.\n No focal lesion. ") == cache.key(REPORTS[0])
    assert cache.missing(["", None, "   ", "Never embedded."]) == [3]


def test_a_changed_report_is_the_only_one_embedded_again(tower, tmp_path):
    out = tmp_path / "cache"
    build_text_cache(tower, REPORTS, out, progress=False)
    changed = [*REPORTS[:2], "Cardiomegaly. Small left pleural effusion.", *REPORTS[3:]]

    cache = TextEmbeddingCache(out)
    assert cache.missing(changed) == [2]
    with pytest.raises(TextCacheError, match=r"no embedding for 1 of 8 texts; run `fm3d text-cache build"):
        cache.vectors(changed)

    stats = build_text_cache(tower, changed, out, progress=False)
    assert (stats.embedded, stats.reused) == (1, len(REPORTS) - 1)
    np.testing.assert_allclose(
        TextEmbeddingCache(out).vectors(changed), tower.embed(changed).numpy(), atol=1e-6
    )


def test_a_killed_build_resumes_with_only_the_rest(tower, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real_embed = TextTower.embed
    calls = []

    def embed_then_die(self, texts, batch_size=32):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill arrives while the second part is embedded
        return real_embed(self, texts, batch_size)

    monkeypatch.setattr(TextTower, "embed", embed_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_text_cache(tower, REPORTS, out, flush_every=3, progress=False)
    monkeypatch.setattr(TextTower, "embed", real_embed)
    parts = list((out / PARTS_FOLDER).iterdir())
    assert len(parts) == 1 and len(TextEmbeddingCache(out)) == 3

    stats = build_text_cache(tower, REPORTS, out, flush_every=3, progress=False)
    assert (stats.embedded, stats.reused) == (len(REPORTS) - 3, 3)
    build_text_cache(tower, REPORTS, tmp_path / "whole", progress=False)
    resumed, whole = _all_vectors(out), _all_vectors(tmp_path / "whole")
    assert resumed.keys() == whole.keys()
    for key, vector in whole.items():
        np.testing.assert_allclose(resumed[key], vector, atol=1e-6)


def test_shards_into_one_folder_equal_a_single_build(tower, tmp_path):
    first = build_text_cache(tower, REPORTS, tmp_path / "sharded", shard=(0, 2), progress=False)
    second = build_text_cache(tower, REPORTS, tmp_path / "sharded", shard=(1, 2), progress=False)
    keys = [text_key(text, False) for text in REPORTS]
    assert first.embedded == sum(int(k, 16) % 2 == 0 for k in keys) and first.embedded + second.embedded == 8
    assert first.embedded > 0 and second.embedded > 0
    build_text_cache(tower, REPORTS, tmp_path / "single", progress=False)
    sharded, single = _all_vectors(tmp_path / "sharded"), _all_vectors(tmp_path / "single")
    assert sharded.keys() == single.keys() == set(keys)
    for key in keys:
        np.testing.assert_allclose(sharded[key], single[key], atol=1e-6)
    with pytest.raises(TextCacheError, match="shard 2/2 does not exist"):
        build_text_cache(tower, REPORTS, tmp_path / "sharded", shard=(2, 2))


def test_other_settings_are_refused_naming_every_difference(model, tower, tmp_path):
    out = tmp_path / "cache"
    build_text_cache(tower, REPORTS, out, progress=False)
    other = TextTower(model, pooling="cls", max_length=24, lowercase=True)
    with pytest.raises(TextCacheError) as refused:
        build_text_cache(other, REPORTS, out, progress=False)
    message = str(refused.value)
    assert "pooling: cache 'mean', this run 'cls'" in message
    assert "max_length: cache 32, this run 24" in message
    assert "lowercase: cache False, this run True" in message

    cache = TextEmbeddingCache(out)
    cache.check_settings(tower.settings.to_dict())  # the same settings pass
    retrained = init_text_model(
        tmp_path / "retrained", REPORTS * 4, vocab_size=120, hidden_size=16, max_length=32, seed=1
    )
    expected = TextTower(retrained, pooling="mean", max_length=32).settings.to_dict()
    with pytest.raises(
        TextCacheError, match=r"other text settings \(model: cache .*model_hash: cache '"
    ) as refused:
        cache.check_settings(expected)
    assert "into another folder" in str(refused.value)
    # Calling the same model files by another name is the same model.
    cache.check_settings({**tower.settings.to_dict(), "model": "/elsewhere/same-files"})


def test_folders_that_are_not_caches_are_named(tmp_path, tower):
    with pytest.raises(TextCacheError, match=r"is not a report-embedding cache \(no settings.json"):
        TextEmbeddingCache(tmp_path)
    (tmp_path / "settings.json").write_text("{not json")
    with pytest.raises(TextCacheError, match="is not valid JSON"):
        TextEmbeddingCache(tmp_path)
    (tmp_path / "settings.json").write_text('{"format_version": 99}')
    with pytest.raises(TextCacheError, match="format version 99, this fm3d reads 1"):
        TextEmbeddingCache(tmp_path)
    build_text_cache(tower, [], tmp_path / "empty", progress=False)
    with pytest.raises(TextCacheError, match="holds no embeddings yet"):
        TextEmbeddingCache(tmp_path / "empty")


def test_the_real_ct_rate_reports_are_all_cached_and_long_ones_chunked(shared_data, model, tmp_path):
    table = pl.read_csv(shared_data / "reports/ct_rate/validation_reports_subset.csv")
    findings = table["Findings_EN"].to_list()
    assert len(findings) == 1211
    tower = TextTower(model, pooling="mean", max_length=32, long_reports="chunks")
    stats = build_text_cache(tower, findings, tmp_path / "cache", batch_size=64, progress=False)
    cache = TextEmbeddingCache(tmp_path / "cache")
    assert stats.embedded == len(cache) == len({cache.key(text) for text in findings if text})
    assert cache.missing(findings) == []
    # Findings run past 32 tokens: chunks cover them, so their embedding depends on the whole text.
    long = max(findings, key=len)
    assert len(tower.tokenizer(long)["input_ids"]) > 32 and len(tower.chunk_texts(long)) > 1
    start = long[: len(tower.chunk_texts(long)[0])]
    np.testing.assert_allclose(cache.vectors([long])[0], tower.embed([long])[0].numpy(), atol=1e-5)
    assert not np.allclose(cache.vectors([long])[0], tower.embed([start])[0].numpy(), atol=1e-3)
