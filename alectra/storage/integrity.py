"""Shard integrity when a dataset is opened: sizes always, checksums and token range once per shard identity.

`open_shards(manifest)` opens every shard of a dataset folder and checks

- every time (cost: a few `stat`s and the index): the ``.bin`` size against its ``.idx`` (`IndexedDataset`)
  and the sequence/document/token counts against the manifest;
- once per *shard identity* -- path, size, mtime_ns, ctime_ns, inode and device of both files: the SHA-256 of
  ``.bin`` and ``.idx`` against the manifest and every token id against the vocabulary, in one pass over the
  file. A shard that passed is recorded in ``verified.json`` beside the manifest (written atomically), so a
  later open of unchanged files costs only the stats. Any write to a shard changes its mtime and ctime, so a
  shard corrupted after it was verified is verified again; bit rot that changes no metadata is not seen
  after the first open (`python -m data_prep verify` always reads everything).

Where the dataset folder is read-only, the record goes to ``$XDG_CACHE_HOME/alectra/verified/`` (default
``~/.cache``); if that cannot be written either, every open verifies again and says so once in the log.
Ranks that open the same dataset at once take turns through an fcntl lock beside the record, so the first
one reads the files and the others find its record (the kernel releases the lock if its holder dies).

A shard that fails raises `ShardError`: one line naming the file, what is wrong (truncated, checksum, the
first token id out of range with its offset) and how to fix it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from alectra.storage.atomic import write_json_atomic
from alectra.storage.indexed import IndexedDataset, IndexFormatError, file_sha256

log = logging.getLogger(__name__)

RECORD_NAME = "verified.json"
RECORD_VERSION = 1
SCAN_BLOCK_BYTES = 1 << 22  # 4 MiB per hash update / min-max reduction
# A file modified less than this long before its scan started may change again within the same timestamp
# tick (the kernel's coarse clock) with no new mtime: such a shard is verified but not recorded (the
# "racily clean" case of git's index). A write after that gets a later mtime, so mtime alone decides.
RACY_NS = 1_000_000_000


class ShardError(ValueError):
    """A shard that is missing, truncated, corrupt or out of the vocabulary; the message says which and
    what to do."""


def _verify_hint(root: Path) -> str:
    return f"`python -m data_prep verify {root}` lists every damaged shard"


def open_shard(root: Path, entry: dict) -> IndexedDataset:
    """The reader of one manifest shard, its sizes and counts checked (cheap); `ShardError` otherwise."""
    prefix = root / entry["prefix"]  # absolute for shards adopted with import-megatron
    try:
        ds = IndexedDataset(prefix)
    except (IndexFormatError, FileNotFoundError) as exc:
        raise ShardError(f"{exc}; {_verify_hint(root)}") from None
    got = (len(ds), ds.num_documents, ds.num_tokens)
    want = (entry["sequences"], entry["documents"], entry["tokens"])
    if got != want:
        raise ShardError(
            f"{prefix}: {got[0]} sequences / {got[1]} documents / {got[2]} tokens, the manifest says "
            f"{want[0]} / {want[1]} / {want[2]}: rebuild it; {_verify_hint(root)}"
        )
    return ds


def scan_shard(ds: IndexedDataset) -> dict:
    """One pass over the shard: ``bin_sha256``, ``idx_sha256``, ``min_token``, ``max_token`` and whether the
    sequences lie back to back in ``.bin`` (``contiguous``, as the example builder reads them)."""
    h = hashlib.sha256()
    lo, hi = 0, -1  # an empty shard is in range of any vocabulary
    block = max(1, SCAN_BLOCK_BYTES // ds.dtype.itemsize)
    for a in range(0, len(ds.tokens), block):
        part = ds.tokens[a : a + block]  # a view of the mmap: hashed and reduced without a copy
        h.update(part)
        lo = int(part.min()) if a == 0 else min(lo, int(part.min()))
        hi = max(hi, int(part.max()))
    expected = np.zeros(len(ds), dtype=np.int64)  # (S,) byte offsets of back-to-back sequences
    np.cumsum(np.asarray(ds.lengths[:-1], dtype=np.int64) * ds.dtype.itemsize, out=expected[1:])
    return {
        "bin_sha256": h.hexdigest(),
        "idx_sha256": file_sha256(ds.prefix + ".idx"),
        "min_token": lo,
        "max_token": hi,
        "contiguous": bool(np.array_equal(np.asarray(ds.pointers), expected)),  # span() relies on it
    }


def _agrees(entry: dict, facts: dict, vocab_size: int) -> bool:
    return (
        facts["bin_sha256"] == entry["bin_sha256"]
        and facts["idx_sha256"] == entry["idx_sha256"]
        and facts["min_token"] >= 0
        and facts["max_token"] < vocab_size
        and facts["contiguous"]
    )


def first_out_of_range(ds: IndexedDataset, vocab_size: int) -> tuple[int, int, int] | None:
    """``(token offset, sequence, id)`` of the first token id outside ``[0, vocab_size)``, or None."""
    block = max(1, SCAN_BLOCK_BYTES // ds.dtype.itemsize)
    for a in range(0, len(ds.tokens), block):
        part = ds.tokens[a : a + block]
        bad = np.flatnonzero((part < 0) | (part >= vocab_size))
        if len(bad):
            offset = a + int(bad[0])
            starts = np.asarray(ds.pointers) // ds.dtype.itemsize
            sequence = int(np.searchsorted(starts, offset, side="right")) - 1
            return offset, sequence, int(part[bad[0]])
    return None


def content_problems(ds: IndexedDataset, entry: dict, facts: dict, vocab_size: int) -> list[str]:
    """What `scan_shard`'s ``facts`` say is wrong with a shard against its manifest ``entry`` (one phrase
    each, naming the file)."""
    name = Path(ds.prefix).name
    problems = [
        f"{name}.{ext}: checksum mismatch (sha256 {facts[f'{ext}_sha256'][:12]}, the manifest records "
        f"{entry[f'{ext}_sha256'][:12]}): the file is corrupt"
        for ext in ("bin", "idx")
        if facts[f"{ext}_sha256"] != entry[f"{ext}_sha256"]
    ]
    bad = (
        first_out_of_range(ds, vocab_size)
        if facts["min_token"] < 0 or facts["max_token"] >= vocab_size
        else None
    )
    if bad is not None:
        offset, sequence, token = bad
        problems.append(
            f"{name}.bin: token id {token} at token offset {offset} (byte {offset * ds.dtype.itemsize}, "
            f"sequence {sequence}) is outside the vocabulary of {vocab_size} ids"
        )
    return problems


def _identity(prefix: str | os.PathLike) -> list[list[int]]:
    """What changes when either file of the shard is rewritten, replaced or moved."""
    out = []
    for ext in ("bin", "idx"):
        st = os.stat(f"{prefix}.{ext}")
        out.append([st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    return out


def _user_record_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "alectra" / "verified"


def record_locations(root: Path) -> list[Path]:
    """Where a dataset's verification record may live: beside its manifest, else in the user's cache."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / RECORD_NAME, _user_record_dir() / f"{key}.json"]


def _read_records(root: Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    for path in reversed(record_locations(root)):  # the folder's own record wins over the user cache
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("version") == RECORD_VERSION:
            records.update(data.get("shards", {}))
    return records


def _write_records(root: Path, records: dict[str, dict]) -> bool:
    for path in record_locations(root):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"version": RECORD_VERSION, "shards": records})
            return True
        except OSError:
            continue
    return False


@contextlib.contextmanager
def _turns(root: Path) -> Iterator[None]:
    """An exclusive fcntl lock beside the record while one process verifies (none if none can be made)."""
    fd = None
    for path in record_locations(root):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. ENOLCK on a network file system without locking: verify without turns
            os.close(fd)
            fd = None
        break
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def open_shards(manifest: dict) -> list[IndexedDataset]:
    """Readers of every shard of a loaded manifest (`load_manifest`), checked as the module docstring says."""
    root = Path(manifest["_dir"])
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    entries = manifest["shards"]
    with _turns(root):
        known = _read_records(root)
        identities, shards = [], []
        for entry in entries:
            try:  # taken before the files are mapped: a replacement during the open shows below
                identities.append(_identity(root / entry["prefix"]))
            except FileNotFoundError:
                identities.append(None)  # open_shard names the missing file
            shards.append(open_shard(root, entry))
        records, scanned, started = {}, 0, time.perf_counter()
        for entry, ds, ident in zip(entries, shards, identities, strict=True):
            key = str(Path(ds.prefix).resolve())
            if _identity(ds.prefix) != ident:
                raise ShardError(f"{ds.prefix}: changed while being opened; is a build writing into {root}?")
            cached = known.get(key)
            if cached is not None and cached["identity"] == ident and _agrees(entry, cached, vocab_size):
                records[key] = cached
                continue
            scan_start = time.time_ns()
            facts = scan_shard(ds)
            scanned += 1
            if not _agrees(entry, facts, vocab_size):
                problems = content_problems(ds, entry, facts, vocab_size)
                raise ShardError(
                    f"{Path(ds.prefix).parent}/{'; '.join(problems)}; rebuild the shard (data_prep: delete "
                    f"its .json record, rerun the build); {_verify_hint(root)}"
                )
            newest_write = max(f[1] for f in ident)  # mtime_ns of .bin and .idx
            if _identity(ds.prefix) == ident and scan_start - newest_write >= RACY_NS:
                records[key] = {**facts, "identity": ident}
        if scanned:
            log.info(
                "verified %d of %d shard(s) of %s in %.1f s (checksums, token range)",
                scanned,
                len(shards),
                root,
                time.perf_counter() - started,
            )
        changed = any(known.get(k) != v for k, v in records.items())
        if changed and not _write_records(root, records):
            log.warning(
                "%s: cannot record the shard verification (read-only folder and %s); every open re-reads "
                "the shards",
                root,
                _user_record_dir(),
            )
    return shards
