"""data_prep build: sources, byte-identical output for any parallelism, kill/resume, bad input, verify."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data_prep
from alectra.storage import IndexedDataset, check_tokenizer, load_manifest
from data_prep.cli import main
from data_prep.sentences import split_sentences
from data_prep.tokenizer import train_tokenizer
from tests import waiting

REPO = Path(__file__).resolve().parents[1]


def corpus_docs(n=300):
    """Real English paragraphs (the pydoc topics), cut into documents of a few paragraphs."""
    from pydoc_data.topics import topics

    paras = [p.strip() for t in sorted(topics) for p in topics[t].split("\n\n") if len(p.split()) > 5]
    return [" ".join(" ".join(p.split()) for p in paras[i : i + 3]) for i in range(0, 3 * n, 3)][:n]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(train_tokenizer(corpus_docs(400), tmp_path_factory.mktemp("tok") / "tok", vocab_size=1200))


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(corpus_docs(300))))
    return path


def shard_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).glob("shard_*.[bi][id][nx]"))}


def run_build(*args):
    return main(["build", "--no-progress", *map(str, args)])


def test_build_roundtrip_and_manifest(tmp_path, tok_dir, jsonl):
    from transformers import AutoTokenizer

    out = tmp_path / "ds"
    assert run_build("--input", jsonl, "--tokenizer", tok_dir, "-o", out, "--docs-per-shard", 70) == 0
    m = load_manifest(out)
    assert m["format"] == "alectra-indexed/1" and len(m["shards"]) == 5  # 300 docs / 70 per shard
    assert m["tokenizer"]["special_tokens"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert "--docs-per-shard" in m["command"] and m["stats"]["documents"] == 300
    tok = AutoTokenizer.from_pretrained(tok_dir)
    check_tokenizer(m, tok)
    ds = IndexedDataset(out / "shard_00000")
    # one sequence per sentence, no special tokens, and together they are the document's tokens
    multi = [d for d in range(ds.num_documents) if len(ds.document(d)) > 2]
    assert ds.num_documents == 70 and len(multi) > 10
    for d in multi[:5]:
        expected = tok(corpus_docs(70)[d], add_special_tokens=False)["input_ids"]
        assert np.concatenate(ds.document(d)).tolist() == expected
    assert main(["verify", str(out)]) == 0


def test_sources_agree(tmp_path, tok_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = corpus_docs(40)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("\n\n".join(docs[:20]) + "\n")
    with gzip.open(tmp_path / "txt" / "b.txt.gz", "wt") as f:
        f.write("\n\n\n".join(docs[20:]))
    lines = "".join(json.dumps({"body": d}) + "\n" for d in docs)
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    for i, d in enumerate(docs):
        # blank lines inside a document: one file is one document in --text-mode file
        (tmp_path / "files" / f"{i:03d}.txt").write_text("\n\n".join(split_sentences(d, "rules")))
    variants = {
        "dir": ["--input", tmp_path / "txt"],
        "glob": ["--input", str(tmp_path / "txt" / "*")],
        "zst": ["--input", tmp_path / "d.jsonl.zst", "--json-key", "body"],
        "parquet": ["--input", tmp_path / "d.parquet"],
        "hf_saved": ["--hf-dataset", tmp_path / "saved"],
        "hf_parquet": ["--hf-dataset", "parquet", "--hf-data-files", tmp_path / "d.parquet", "--streaming"],
        "file_mode": ["--input", tmp_path / "files", "--text-mode", "file"],
    }
    results = {}
    for name, args in variants.items():
        assert run_build(*args, "--tokenizer", tok_dir, "-o", tmp_path / name, "--docs-per-shard", 15) == 0, (
            name
        )
        results[name] = shard_bytes(tmp_path / name)
    first = results.pop("dir")
    assert len(first) == 6
    for name, got in results.items():
        assert got == first, name


def test_output_independent_of_parallelism(tmp_path, tok_dir, jsonl):
    common = ["--input", jsonl, "--tokenizer", tok_dir, "--docs-per-shard", 40]
    assert run_build(*common, "-o", tmp_path / "w1") == 0
    assert run_build(*common, "-o", tmp_path / "w2", "--workers", 2) == 0
    for i in range(3):  # a SLURM-array-style build in 3 jobs, then merge
        assert run_build(*common, "-o", tmp_path / "j3", "--num-shards", 3, "--shard-index", i) == 0
    assert main(["merge", str(tmp_path / "j3")]) == 0
    ref = shard_bytes(tmp_path / "w1")
    assert len(ref) == 16 and shard_bytes(tmp_path / "w2") == ref and shard_bytes(tmp_path / "j3") == ref
    shards = [load_manifest(tmp_path / d)["shards"] for d in ("w1", "w2", "j3")]
    assert shards[0] == shards[1] == shards[2]


def test_merge_refuses_incomplete(tmp_path, tok_dir, jsonl, capsys):
    common = ["--input", jsonl, "--tokenizer", tok_dir, "--docs-per-shard", 100, "-o", tmp_path / "p"]
    assert run_build(*common, "--num-shards", 2, "--shard-index", 0) == 0
    assert not (tmp_path / "p" / "manifest.json").exists()
    assert main(["merge", str(tmp_path / "p")]) == 2
    assert "1 of 2 jobs have finished" in capsys.readouterr().err


def test_kill_and_resume_is_byte_identical(tmp_path, tok_dir):
    big = tmp_path / "big.jsonl"
    docs = corpus_docs(300)
    big.write_text("".join(json.dumps({"text": docs[i % 300]}) + "\n" for i in range(3000)))
    args = ["--input", big, "--tokenizer", tok_dir, "--docs-per-shard", 100, "--no-progress"]
    cmd = [sys.executable, "-m", "data_prep", "build", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "-o", str(out)], env=env, cwd=REPO)
    deadline = time.time() + waiting.deadline(60)
    while time.time() < deadline and len(list(out.glob("shard_*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("shard_*.json")))
    assert 3 <= done_before < 30 and not (out / "manifest.json").exists()
    # every shard under its final name has its record or will be rewritten; no .idx without .bin
    for idx in out.glob("shard_*.idx"):
        assert idx.with_suffix(".bin").exists()
    assert run_build(*args, "-o", out) == 0
    assert not list(out.glob("*.tmp*"))
    assert run_build(*args, "-o", tmp_path / "clean") == 0
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert load_manifest(out)["shards"] == load_manifest(tmp_path / "clean")["shards"]


def test_bad_inputs_one_clear_line(tmp_path, tok_dir, capsys):
    def err(*args):
        assert run_build(*args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]

    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"text": "Hello there. General Kenobi."}) + "\n")
    bad_key = tmp_path / "bad.jsonl"
    bad_key.write_text(json.dumps({"text": "fine."}) + "\n" + json.dumps({"content": "x"}) + "\n")
    assert "bad.jsonl:2: no key 'text' (found: content)" in err(
        "--input", bad_key, "--tokenizer", tok_dir, "-o", tmp_path / "o1"
    )
    assert not list((tmp_path / "o1").glob("shard_*"))  # nothing half-written stays
    not_json = tmp_path / "nj.jsonl"
    not_json.write_text("{oops\n")
    assert "nj.jsonl:1: invalid JSON" in err(
        "--input", not_json, "--tokenizer", tok_dir, "-o", tmp_path / "o2"
    )
    assert "no such file" in err(
        "--input", tmp_path / "missing.txt", "--tokenizer", tok_dir, "-o", tmp_path / "o3"
    )
    corrupt = tmp_path / "c.txt.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00garbage-not-gzip")
    assert "c.txt.gz: cannot read" in err("--input", corrupt, "--tokenizer", tok_dir, "-o", tmp_path / "o4")
    msg = err("--input", ok, "--tokenizer", "no-such-org/no-such-tokenizer", "-o", tmp_path / "o5")
    assert "cannot load tokenizer 'no-such-org/no-such-tokenizer'" in msg
    (tmp_path / "x.csv").write_text("a,b\n")
    assert "x.csv: unknown file type" in err(
        "--input", tmp_path / "x.csv", "--tokenizer", tok_dir, "-o", tmp_path / "o6"
    )
    other_tok = str(train_tokenizer(corpus_docs(50), tmp_path / "tok2", vocab_size=500))
    assert run_build("--input", ok, "--tokenizer", tok_dir, "-o", tmp_path / "o7") == 0
    capsys.readouterr()
    assert "another tokenizer" in err("--input", ok, "--tokenizer", other_tok, "-o", tmp_path / "o7")
    msg = err("--hf-dataset", "no-such-org/no-such-dataset", "--tokenizer", tok_dir, "-o", tmp_path / "o8")
    assert "cannot load Hugging Face dataset 'no-such-org/no-such-dataset'" in msg


def test_invalid_utf8_and_empty_documents_are_counted(tmp_path, tok_dir):
    raw = b"Good text here.\n\n\xff\xfe broken bytes. Still text.\n\n" + b"   \n\n" + b"Last one."
    (tmp_path / "t.txt").write_bytes(raw)
    lines = [json.dumps({"text": t}) for t in ("fine.", "", "  ", "also fine.")]
    (tmp_path / "e.jsonl").write_text("\n".join(lines) + "\n")
    assert run_build("--input", tmp_path / "t.txt", "--tokenizer", tok_dir, "-o", tmp_path / "a") == 0
    st = load_manifest(tmp_path / "a")["stats"]
    assert (st["invalid_utf8_documents"], st["documents"]) == (1, 3)
    assert run_build("--input", tmp_path / "e.jsonl", "--tokenizer", tok_dir, "-o", tmp_path / "b") == 0
    st = load_manifest(tmp_path / "b")["stats"]
    assert (st["input_documents"], st["empty_documents"], st["documents"]) == (4, 2, 2)


def test_verify_and_inspect(tmp_path, tok_dir, jsonl, capsys):
    out = tmp_path / "ds"
    assert run_build("--input", jsonl, "--tokenizer", tok_dir, "-o", out, "--docs-per-shard", 100) == 0
    assert main(["inspect", str(out), "--num-examples", 1]) == 0
    text = capsys.readouterr().out
    assert "documents 300" in text and "sentence length" in text and "--- document 0 ---" in text
    assert "--- example 0 (length " in text and "[CLS]" in text and "[SEP]" in text
    b = out / "shard_00001.bin"
    data = bytearray(b.read_bytes())
    data[10] ^= 0xFF
    b.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert "shard_00001: BAD: shard_00001.bin: checksum mismatch" in capsys.readouterr().out


def test_prepare_demo_idempotent(tmp_path):
    from transformers import AutoTokenizer, BertTokenizer

    out = data_prep.prepare_demo(tmp_path / "demo", vocab_size=1000, max_documents=120)
    m = load_manifest(out)
    assert m["stats"]["input_documents"] == 120 and len(m["shards"]) == 1
    for cls in (BertTokenizer, AutoTokenizer):
        check_tokenizer(m, cls.from_pretrained(out / "tokenizer"))
    before = (out / "manifest.json").stat().st_mtime_ns
    t = time.perf_counter()
    assert data_prep.prepare_demo(tmp_path / "demo", vocab_size=1000, max_documents=120) == out
    assert time.perf_counter() - t < 1.0 and (out / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="vocab sha256"):
        check_tokenizer(
            m,
            AutoTokenizer.from_pretrained(
                str(train_tokenizer(corpus_docs(50), tmp_path / "t2", vocab_size=500))
            ),
        )


def test_sentence_splitting_offline():
    text = (
        'Mr. Smith went to Washington. He said "Hi." Then (e.g. here) it ended! Next?\n'
        "A wrapped\nline goes on. J. R. R. Tolkien wrote it.\n\nNew paragraph 2. 3 apples."
    )
    assert split_sentences(text, "rules") == [
        "Mr. Smith went to Washington.",
        'He said "Hi."',
        "Then (e.g. here) it ended!",
        "Next?",
        "A wrapped line goes on.",
        "J. R. R. Tolkien wrote it.",
        "New paragraph 2.",
        "3 apples.",
    ]
    assert split_sentences(" one line. Two\n\n  second line \n", "lines") == ["one line. Two", "second line"]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun (openmpi)")
def test_mpi_ranks_write_the_same_shards(tmp_path, tok_dir, jsonl):
    common = ["--input", jsonl, "--tokenizer", tok_dir, "--docs-per-shard", 40, "--no-progress"]
    assert run_build(*common, "-o", tmp_path / "one") == 0
    cmd = ["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", sys.executable, "-m", "data_prep"]
    cmd += ["build", *map(str, common), "-o", str(tmp_path / "mpi")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, env=env, cwd=REPO, check=True, timeout=waiting.deadline(120), capture_output=True)
    assert len(list((tmp_path / "mpi").glob("part_*.json"))) == 2  # both ranks took part
    assert shard_bytes(tmp_path / "mpi") == shard_bytes(tmp_path / "one")
    assert load_manifest(tmp_path / "mpi")["shards"] == load_manifest(tmp_path / "one")["shards"]


def test_megatron_wrapped_shards_give_the_same_examples(tmp_path, tok_dir, jsonl):
    from alectra.data import build_pretraining_datasets
    from alectra.storage.indexed import IndexedDatasetWriter

    ours = tmp_path / "ours"
    assert run_build("--input", jsonl, "--tokenizer", tok_dir, "-o", ours, "--docs-per-shard", 100) == 0
    m = load_manifest(ours)
    cls, sep = m["tokenizer"]["special_tokens"]["cls"], m["tokenizer"]["special_tokens"]["sep"]
    prefixes = []
    for s in m["shards"]:  # what Megatron's preprocess_data.py writes: every sentence as [CLS] ... [SEP]
        ds = IndexedDataset(ours / s["prefix"])
        w = IndexedDatasetWriter(tmp_path / f"meg_{s['prefix']}", ds.dtype)
        for d in range(ds.num_documents):
            w.add_document([[cls, *seq.tolist(), sep] for seq in ds.document(d)])
        w.finish()
        prefixes.append(str(tmp_path / f"meg_{s['prefix']}"))
    assert main(["import-megatron", *prefixes, "--tokenizer", tok_dir, "-o", str(tmp_path / "meg")]) == 0
    assert load_manifest(tmp_path / "meg")["special_tokens_in_sequences"] is True
    kw = dict(max_seq_length=64, seed=3, valid_fraction=0.0, num_train_samples=None)
    a, _ = build_pretraining_datasets([str(ours)], None, **kw)
    b, _ = build_pretraining_datasets([str(tmp_path / "meg")], None, **kw)
    assert len(a) == len(b) > 100
    for i in range(len(a)):
        assert all((a[i][k] == b[i][k]).all() for k in a[i]), i
