"""Shard checks when a dataset is opened (alectra.storage.integrity): checksums and token range read once per
shard identity and recorded, a record that never hides a later change, and a read-only dataset folder."""

import os

import numpy as np
import pytest

import alectra.storage.integrity as integrity
from alectra.storage.integrity import ShardError, open_shards
from alectra.storage.manifest import load_manifest
from tests.test_data_examples import write_dataset


def write_old_dataset(root, n_shards=3, age_s=60):
    """20 documents per shard, vocabulary 1000, files last written ``age_s`` seconds ago (so not "racily
    clean": see alectra.storage.integrity.RACY_NS)."""
    rng = np.random.default_rng(0)
    docs = [[rng.integers(5, 1000, size=12).tolist() for _ in range(3)] for _ in range(20 * n_shards)]
    write_dataset(root, docs, docs_per_shard=20)
    for f in root.glob("shard_*"):
        past = f.stat().st_mtime_ns - age_s * 10**9
        os.utime(f, ns=(past, past))
    return root


@pytest.fixture
def scans(monkeypatch):
    """Counts the full reads of shards."""
    calls = []
    real = integrity.scan_shard

    def counting(ds):
        calls.append(os.path.basename(ds.prefix))
        return real(ds)

    monkeypatch.setattr(integrity, "scan_shard", counting)
    return calls


def test_checked_once_then_recorded(tmp_path, scans):
    data = write_old_dataset(tmp_path / "ds")
    assert len(open_shards(load_manifest(data))) == 3
    assert scans == ["shard_00000", "shard_00020", "shard_00040"]
    assert (data / "verified.json").is_file()
    open_shards(load_manifest(data))
    assert len(scans) == 3  # unchanged files: no second read


def test_a_change_after_the_record_is_caught(tmp_path, scans):
    data = write_old_dataset(tmp_path / "ds")
    open_shards(load_manifest(data))
    with open(data / "shard_00020.bin", "r+b") as f:  # same size, valid ids: only the checksum can tell
        f.seek(40)
        f.write(b"\x05\x00" * 8)
    with pytest.raises(ShardError, match=r"shard_00020.bin: checksum mismatch .* the file is corrupt"):
        open_shards(load_manifest(data))
    assert scans[3:] == ["shard_00020"]  # only the changed shard is read again


def test_recently_written_shard_is_checked_but_not_recorded(tmp_path, scans):
    data = write_old_dataset(tmp_path / "ds", n_shards=1, age_s=0)
    open_shards(load_manifest(data))
    open_shards(load_manifest(data))
    assert scans == ["shard_00000", "shard_00000"]


def test_read_only_folder_records_in_the_user_cache(tmp_path, scans, monkeypatch):
    data = write_old_dataset(tmp_path / "ds")
    (data / "verified.json").mkdir()  # the record cannot be written there (chmod does not stop root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    open_shards(load_manifest(data))
    assert len(list((tmp_path / "cache" / "alectra" / "verified").glob("*.json"))) == 1
    open_shards(load_manifest(data))
    assert len(scans) == 3


def test_nowhere_to_record_still_checks_every_open(tmp_path, scans, monkeypatch, caplog):
    data = write_old_dataset(tmp_path / "ds", n_shards=1)
    (data / "verified.json").mkdir()
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    open_shards(load_manifest(data))
    open_shards(load_manifest(data))
    assert len(scans) == 2 and "cannot record the shard verification" in caplog.text


def test_counts_and_sizes_are_checked_on_every_open(tmp_path):
    data = write_old_dataset(tmp_path / "ds", n_shards=1)
    open_shards(load_manifest(data))
    with open(data / "shard_00000.bin", "ab") as f:
        f.write(b"\x05\x00")
    with pytest.raises(ShardError, match=r"shard_00000.bin: 1442 bytes, the index describes 1440"):
        open_shards(load_manifest(data))
    manifest = load_manifest(data)
    manifest["shards"][0]["documents"] = 21
    (data / "shard_00000.bin").write_bytes((data / "shard_00000.bin").read_bytes()[:-2])
    with pytest.raises(ShardError, match=r"20 documents .* the manifest says 60 / 21 / 720"):
        open_shards(manifest)
