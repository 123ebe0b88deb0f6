"""Shards of an array job: a stable hash of the key, disjoint parts that cover every key."""

from __future__ import annotations

import argparse
import hashlib

import pytest

from fm3d.sharding import WHOLE, Shard, parse_shard, shard_of


def test_the_shard_is_the_keys_blake2b_hash_modulo_the_count() -> None:
    digest = hashlib.blake2b(b"train_1_a_1", digest_size=8).hexdigest()
    assert shard_of("train_1_a_1", 7) == int(digest, 16) % 7
    assert shard_of("train_1_a_1", 1) == 0


def test_the_shards_of_a_split_are_disjoint_and_cover_every_key() -> None:
    keys = [f"study{i}" for i in range(1000)]
    parts = [[key for key in keys if Shard(i, 4).owns(key)] for i in range(4)]
    assert sorted(key for part in parts for key in part) == sorted(keys)
    assert all(200 < len(part) < 300 for part in parts)  # a hash spreads them evenly
    assert all(WHOLE.owns(key) for key in keys) and WHOLE.whole


def test_names_sort_by_index_and_say_the_count() -> None:
    assert Shard(3, 12).name == "0003-of-0012" and str(Shard(3, 12)) == "3/12"


@pytest.mark.parametrize(
    ("value", "message"),
    [("4/4", "shard 4/4 does not exist"), ("-1/4", "does not exist"), ("0/0", "does not exist"),
     ("1", "expected I/N"), ("a/b", "expected I/N")],
)  # fmt: skip
def test_a_bad_flag_names_the_problem(value: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_shard(value)
    assert parse_shard("2/8") == Shard(2, 8)
