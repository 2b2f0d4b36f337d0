"""Megatron MMIDIDX format: our writer/reader against a minimal independent implementation written here
from the format description (docs/data_prep.md, PITFALLS.md), plus corruption detection."""

import struct

import numpy as np
import pytest

from alectra.storage.indexed import IndexedDataset, IndexedDatasetWriter, IndexFormatError, token_dtype

# Megatron's dtype codes, restated independently of alectra.storage.indexed.
CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


def independent_read(prefix):
    """Read .idx/.bin with struct + numpy only."""
    with open(f"{prefix}.idx", "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", raw, 18)
    off = 34
    lengths = np.frombuffer(raw, np.int32, n_seq, off)
    pointers = np.frombuffer(raw, np.int64, n_seq, off + 4 * n_seq)
    doc_idx = np.frombuffer(raw, np.int64, n_doc, off + 12 * n_seq)
    assert off + 12 * n_seq + 8 * n_doc == len(raw)
    data = open(f"{prefix}.bin", "rb").read()
    dtype = np.dtype(CODES[code])
    seqs = [np.frombuffer(data, dtype, int(n), int(p)) for n, p in zip(lengths, pointers, strict=True)]
    return version, code, seqs, doc_idx


def independent_write(prefix, docs, dtype):
    code = {np.dtype(v): k for k, v in CODES.items()}[np.dtype(dtype)]
    seqs = [np.asarray(s, dtype) for d in docs for s in d]
    lengths = np.array([len(s) for s in seqs], np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize)])
    doc_idx = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<QQ", len(seqs), len(doc_idx)))
        f.write(lengths.tobytes() + pointers.astype(np.int64).tobytes() + doc_idx.tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        for s in seqs:
            f.write(s.tobytes())


def random_docs(rng, vocab, n_docs=40):
    return [
        [rng.integers(0, vocab, size=rng.integers(1, 30)).tolist() for _ in range(rng.integers(1, 6))]
        for _ in range(n_docs)
    ]


@pytest.mark.parametrize("vocab,code", [(30522, 8), (65499, 8), (65500, 4), (250002, 4)])
def test_writer_matches_independent_reader(tmp_path, vocab, code):
    rng = np.random.default_rng(vocab)
    docs = random_docs(rng, vocab)
    w = IndexedDatasetWriter(tmp_path / "d", token_dtype(vocab))
    for d in docs:
        w.add_document(d)
    counts = w.finish()
    version, got_code, seqs, doc_idx = independent_read(tmp_path / "d")
    assert (version, got_code) == (1, code)
    flat = [s for d in docs for s in d]
    assert [s.tolist() for s in seqs] == flat
    assert doc_idx.tolist() == [0, *np.cumsum([len(d) for d in docs]).tolist()]
    assert counts["sequences"] == len(flat) and counts["documents"] == len(docs)
    assert not list(tmp_path.glob("*.tmp"))


def test_reader_reads_independent_writer(tmp_path):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 30522)
    independent_write(tmp_path / "m", docs, np.uint16)
    ds = IndexedDataset(tmp_path / "m")
    assert ds.dtype == np.uint16 and len(ds) == sum(len(d) for d in docs) and ds.num_documents == len(docs)
    for i, d in enumerate(docs):
        assert [s.tolist() for s in ds.document(i)] == d
    assert ds.span(int(ds.doc_idx[1]), int(ds.doc_idx[3])).tolist() == sum(docs[1] + docs[2], [])


def test_corruption_is_reported(tmp_path):
    independent_write(tmp_path / "m", [[[1, 2, 3]], [[4, 5]]], np.uint16)
    bin_path = tmp_path / "m.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-2])  # truncated .bin
    with pytest.raises(IndexFormatError, match="truncated"):
        IndexedDataset(tmp_path / "m")
    idx = tmp_path / "m.idx"
    idx.write_bytes(b"NOTMAGIC!" + idx.read_bytes()[9:])
    with pytest.raises(IndexFormatError, match="bad magic"):
        IndexedDataset(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="missing"):
        IndexedDataset(tmp_path / "nothing")
