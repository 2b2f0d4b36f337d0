"""Corpus -> Megatron indexed token shards (``python -m data_prep``), tokenizer training, the demo corpus."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["prepare_demo"]

DEMO_DOCS_PER_SHARD = 500  # the demo corpus (~4,700 documents) becomes ~10 shards


def prepare_demo(
    output_dir: str | os.PathLike,
    *,
    vocab_size: int = 8192,
    max_documents: int | None = None,
    workers: int = 1,
) -> Path:
    """Train an uncased WordPiece tokenizer on the demo corpus and build its shards into ``output_dir``.

    Reproducible: the same arguments give byte-identical ``tokenizer/vocab.txt`` and shards in every process
    (on the same Python version, which fixes the corpus; `data_prep.tokenizer` says how training is made
    deterministic). ``max_documents`` limits both the tokenizer's training documents and the shards.

    Idempotent: when ``output_dir/manifest.json`` already records the same ``vocab_size`` and
    ``max_documents``, returns at once. ``workers`` does not change the output.
    """
    from data_prep.build import BuildConfig, build
    from data_prep.demo import demo_documents
    from data_prep.sources import DemoSource
    from data_prep.tokenizer import train_tokenizer

    out = Path(output_dir)
    demo_args = {"vocab_size": vocab_size, "max_documents": max_documents}
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("demo") == demo_args:
        return out
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file() or _demo_args(out) != demo_args:
        _remove_demo_build(out)  # another vocabulary: earlier shards and plans no longer apply
        out.mkdir(parents=True, exist_ok=True)
        docs = demo_documents()
        if max_documents is not None:
            import itertools

            docs = itertools.islice(docs, max_documents)
        train_tokenizer(docs, tok_dir, vocab_size=vocab_size)
        (out / "demo_args.json").write_text(json.dumps(demo_args))
    cfg = BuildConfig(
        output_dir=out,
        tokenizer=str(tok_dir),
        sentence_split="rules",
        docs_per_shard=DEMO_DOCS_PER_SHARD,
        workers=workers,
        command=f"data_prep.prepare_demo({str(out)!r}, vocab_size={vocab_size}, "
        f"max_documents={max_documents})",
        progress=False,
    )
    result = build(cfg, DemoSource(max_documents=max_documents))
    assert result is not None  # a single-process build always completes
    result["demo"] = demo_args
    from alectra.storage.atomic import write_json_atomic

    write_json_atomic(manifest, result)
    return out


def _remove_demo_build(out: Path) -> None:
    import shutil

    for pattern in ("shard_*", "part_*_of_*.json", "build.json", "manifest.json", "demo_args.json"):
        for p in out.glob(pattern):
            p.unlink()
    shutil.rmtree(out / "plans", ignore_errors=True)


def _demo_args(out: Path) -> dict | None:
    p = out / "demo_args.json"
    return json.loads(p.read_text()) if p.is_file() else None
