"""Megatron-LM ``MMapIndexedDataset`` format: a memory-mapped reader and a streaming writer.

Layout (Megatron-LM ``megatron/core/datasets/indexed_dataset.py``, format version 1):

``<prefix>.idx``::

    9 bytes   magic ``b"MMIDIDX\\x00\\x00"``
    <Q        version = 1
    <B        dtype code (Megatron's meaning: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
              6 float64, 7 float32, 8 uint16 -- GPT-NeoX/DeepSpeed copies differ for 6..8)
    <Q        sequence count S
    <Q        document-index length D + 1
    int32[S]  sequence lengths (in tokens)
    int64[S]  sequence byte offsets into ``.bin``
    int64[D+1] document index: the first sequence of every document, then S

``<prefix>.bin``: the tokens of every sequence back to back, in the dtype above.

Reading maps both files; memory stays O(1) in the corpus size.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from alectra.storage.atomic import fsync_dir, temporary_path, write_bytes_atomic

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron-LM's DType enum (megatron/core/datasets/indexed_dataset.py).
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, doc-index length


class IndexFormatError(ValueError):
    """A ``.idx``/``.bin`` pair that is not a valid Megatron indexed dataset."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when the vocabulary fits (Megatron's rule: below 65,500), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def _map(path: Path) -> np.ndarray:
    """Read-only uint8 view of a whole file through mmap (empty files give an empty array)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


class IndexedDataset:
    """Random access to the sequences and documents of one ``<prefix>.{idx,bin}`` pair, over mmap."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = str(prefix)
        idx_path, bin_path = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing; rebuild the dataset with `python -m data_prep build`")
        # np.frombuffer over mmap (as Megatron does): plain ndarrays, no np.memmap subclass overhead per slice
        idx = _map(idx_path)
        if idx.size < _HEADER.size:
            raise IndexFormatError(f"{idx_path}: truncated header ({idx.size} bytes)")
        magic, version, code, n_seq, n_doc_idx = _HEADER.unpack(bytes(idx[: _HEADER.size]))
        if magic != MAGIC:
            raise IndexFormatError(f"{idx_path}: not a Megatron MMIDIDX index (bad magic {magic!r})")
        if version != VERSION:
            raise IndexFormatError(f"{idx_path}: unsupported index version {version} (expected 1)")
        if code not in DTYPE_CODES:
            raise IndexFormatError(f"{idx_path}: unknown dtype code {code} (Megatron codes are 1..8)")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + n_seq * 4 + n_seq * 8 + n_doc_idx * 8
        if idx.size != expected:
            raise IndexFormatError(
                f"{idx_path}: {idx.size} bytes, the header promises {expected}; "
                "the file is truncated or corrupt"
            )
        off = _HEADER.size
        self.lengths = idx[off : off + n_seq * 4].view(np.int32)  # (S,)
        off += n_seq * 4
        self.pointers = idx[off : off + n_seq * 8].view(np.int64)  # (S,) byte offsets
        off += n_seq * 8
        self.doc_idx = idx[off:].view(np.int64)  # (D+1,)
        if n_doc_idx < 1 or self.doc_idx[0] != 0 or self.doc_idx[-1] != n_seq:
            raise IndexFormatError(f"{idx_path}: document index must start at 0 and end at {n_seq}")
        n_tokens = int(self.lengths.sum(dtype=np.int64))
        bin_size = bin_path.stat().st_size
        if bin_size != n_tokens * self.dtype.itemsize:
            raise IndexFormatError(
                f"{bin_path}: {bin_size} bytes, the index describes {n_tokens * self.dtype.itemsize}; "
                "the shard is truncated or belongs to another index -- rebuild it"
            )
        self.num_tokens = n_tokens
        # An empty .bin cannot be mmapped; a 0-token shard reads as an empty array.
        self.tokens = _map(bin_path).view(self.dtype) if bin_size else np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        """Tokens of sequence ``i`` as a view into the mmap."""
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.lengths[i])]

    def span(self, start_seq: int, end_seq: int) -> np.ndarray:
        """Tokens of sequences ``[start_seq, end_seq)``, contiguous in ``.bin`` by construction."""
        start = int(self.pointers[start_seq]) // self.dtype.itemsize
        last = end_seq - 1
        stop = int(self.pointers[last]) // self.dtype.itemsize + int(self.lengths[last])
        return self.tokens[start:stop]

    def document(self, d: int) -> list[np.ndarray]:
        """The sequences (sentences) of document ``d``."""
        return [self[s] for s in range(int(self.doc_idx[d]), int(self.doc_idx[d + 1]))]


class IndexedDatasetWriter:
    """Streams documents into ``<prefix>.bin``/``.idx`` under temporary names; ``finish`` renames them.

    Files appear under their final names only when complete (``os.replace`` is atomic on POSIX), so an
    interrupted write never leaves a shard a later run takes for finished.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype) -> None:
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no Megatron dtype code")
        self._tmp_bin = temporary_path(self.prefix + ".bin")  # unique per writer
        self._bin = open(self._tmp_bin, "wb")  # closed in finish() or abort()
        self._bin_hash = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self._doc_idx: list[int] = [0]
        self._n_seq = 0

    def add_document(self, sequences: list[np.ndarray] | list[list[int]]) -> None:
        """Append one document made of ``sequences`` (one per sentence)."""
        if not sequences:
            return
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int32, count=len(sequences))
        flat = np.concatenate([np.asarray(s, dtype=self.dtype) for s in sequences]).astype(
            self.dtype, copy=False
        )
        self.add_flat_document(flat, lengths)

    def add_flat_document(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append one document given as its concatenated ``tokens`` and per-sequence ``lengths``."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._bin.write(data)
        self._bin_hash.update(data)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self._n_seq += len(lengths)
        self._doc_idx.append(self._n_seq)

    def finish(self) -> dict:
        """Write the index, rename both files into place; returns counts and SHA-256 checksums."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.asarray(self._doc_idx, dtype=np.int64)
        header = _HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], len(lengths), len(doc_idx))
        idx_bytes = header + lengths.tobytes() + pointers.tobytes() + doc_idx.tobytes()
        # .bin first: a final-named .idx then always has its .bin (the reader checks sizes anyway).
        os.replace(self._tmp_bin, self.prefix + ".bin")
        fsync_dir(Path(self.prefix).parent)
        write_bytes_atomic(self.prefix + ".idx", idx_bytes)
        return {
            "sequences": int(len(lengths)),
            "documents": int(len(doc_idx) - 1),
            "tokens": int(lengths.sum(dtype=np.int64)),
            "bin_sha256": self._bin_hash.hexdigest(),
            "idx_sha256": hashlib.sha256(idx_bytes).hexdigest(),
        }

    def abort(self) -> None:
        """Close and delete the temporary file (used on errors)."""
        self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
