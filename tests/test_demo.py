"""The demo dataset is reproducible: two fresh interpreters build byte-identical vocabularies and shards.

Before the two-pass training in `data_prep.tokenizer`, each process learned another set of ``##`` pieces
(huggingface/tokenizers issue #1794), so vocab.txt and the shards differed between builds.
"""

import json
import subprocess
import sys
from pathlib import Path

from data_prep.tokenizer import BERT_SPECIAL_TOKENS

REPO = Path(__file__).resolve().parents[1]
# A small build (its time is mostly importing transformers): 120 documents and 1,000 pieces are enough
# for tied merges to pick differently.
BUILD = "import sys, data_prep; data_prep.prepare_demo(sys.argv[1], vocab_size=1000, max_documents=120)"


def _build_in_new_process(out: Path) -> dict[str, bytes]:
    subprocess.run([sys.executable, "-c", BUILD, str(out)], cwd=REPO, check=True, timeout=600)
    files = sorted(out.glob("tokenizer/*")) + sorted(out.glob("shard_*"))
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


def test_demo_build_is_byte_identical_across_processes(tmp_path):
    a = _build_in_new_process(tmp_path / "a")
    b = _build_in_new_process(tmp_path / "b")
    assert {"tokenizer/vocab.txt", "tokenizer/tokenizer.json", "shard_00000.bin", "shard_00000.idx"} <= set(a)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab"]
    assert manifests[0]["shards"] == manifests[1]["shards"]  # token counts and checksums
    assert manifests[0]["tokenizer"]["vocab_sha256"] == manifests[1]["tokenizer"]["vocab_sha256"]
    # The ## pieces are seeded through the trainer's special tokens; the saved tokenizer must not keep them
    # as special (they would be split out of raw text and dropped by decode(skip_special_tokens=True)).
    added = json.loads(a["tokenizer/tokenizer.json"])["added_tokens"]
    assert sorted(t["content"] for t in added) == sorted(BERT_SPECIAL_TOKENS)
    assert b"\n##e\n" in a["tokenizer/vocab.txt"]
