"""``python -m data_prep {build,train-tokenizer,inspect,verify,merge}`` (also ``alectra-data-prep``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.sentences import SPLIT_MODES
from data_prep.sources import TEXT_MODES, DemoSource, FileSource, HFSource, Source, expand_inputs


def _add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source (exactly one of --input, --hf-dataset, --demo)")
    g.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="files, folders or globs (.txt/.jsonl/.json/.parquet[.gz|.zst])",
    )
    g.add_argument(
        "--hf-dataset", metavar="NAME", help="Hugging Face dataset name, builder or save_to_disk folder"
    )
    g.add_argument("--hf-config", default=None, help="dataset configuration name")
    g.add_argument("--hf-split", default="train", help="split to read (default: train)")
    g.add_argument(
        "--hf-data-files", nargs="+", default=None, help="data files for builders like parquet/json"
    )
    g.add_argument(
        "--streaming", action="store_true", help="stream the HF dataset instead of downloading it first"
    )
    g.add_argument(
        "--demo", action="store_true", help="the built-in demo corpus (Python's own documentation)"
    )
    g.add_argument("--json-key", default="text", help="JSON field / Parquet or dataset column with the text")
    g.add_argument(
        "--text-mode", choices=TEXT_MODES, default="blank-lines", help="plain-text document boundaries"
    )
    g.add_argument("--max-documents", type=int, default=None, help="read at most this many input documents")
    g.add_argument(
        "--skip-binary-files",
        action="store_true",
        help="skip (and count) input files that look binary instead of stopping at the first one",
    )


def _source(args: argparse.Namespace) -> Source:
    chosen = [bool(args.input), bool(args.hf_dataset), args.demo]
    if sum(chosen) != 1:
        raise DataPrepError("choose exactly one source: --input PATH..., --hf-dataset NAME or --demo")
    if args.max_documents is not None and args.max_documents < 1:
        raise DataPrepError(f"--max-documents {args.max_documents}: must be >= 1")
    if args.demo:
        return DemoSource(max_documents=args.max_documents)
    if args.hf_dataset:
        return HFSource(
            name=args.hf_dataset,
            config=args.hf_config,
            split=args.hf_split,
            streaming=args.streaming,
            data_files=args.hf_data_files,
            text_key=args.json_key,
            max_documents=args.max_documents,
        )
    return FileSource(
        paths=expand_inputs(args.input),
        json_key=args.json_key,
        text_mode=args.text_mode,
        skip_binary=args.skip_binary_files,
        max_documents=args.max_documents,
    )


def cmd_build(args: argparse.Namespace) -> int:
    from data_prep.build import BuildConfig, build

    cfg = BuildConfig(
        output_dir=Path(args.output_dir),
        tokenizer=args.tokenizer,
        sentence_split=args.sentence_split,
        docs_per_shard=args.docs_per_shard,
        workers=args.workers,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        command=shlex.join(["python", "-m", "data_prep", *args.argv]),
        progress=not args.no_progress,
    )
    manifest = build(cfg, _source(args))
    if manifest is None and cfg.num_shards == 1:
        return 0  # an MPI rank other than 0: rank 0 writes the manifest and reports
    if manifest is None:
        print(
            f"this job's shards are done; run `python -m data_prep merge {args.output_dir}` "
            "after all jobs finish"
        )
    else:
        print(f"wrote {Path(args.output_dir) / 'manifest.json'} ({len(manifest['shards'])} shards)")
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from data_prep.tokenizer import train_tokenizer

    out = train_tokenizer(
        _Documents(_source(args)),
        args.output_dir,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
    )
    print(f"wrote tokenizer to {out} (load it with BertTokenizer.from_pretrained({str(out)!r}))")
    return 0


class _Documents:
    """A source's documents, read from the start on every iteration (`train_tokenizer` reads them twice)."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __iter__(self) -> Iterator[str]:
        return (d for chunk in self.source.chunks(10000, lambda k: True) for d in chunk.documents or [])


def cmd_merge(args: argparse.Namespace) -> int:
    from data_prep.build import merge

    manifest = merge(Path(args.output_dir))
    assert manifest is not None  # merge raises while parts are missing
    print(f"wrote {Path(args.output_dir) / 'manifest.json'} ({len(manifest['shards'])} shards)")
    return 0


def cmd_import_megatron(args: argparse.Namespace) -> int:
    from data_prep.build import import_megatron

    command = shlex.join(["python", "-m", "data_prep", *args.argv])
    manifest = import_megatron(args.prefix, args.tokenizer, Path(args.output_dir), command=command)
    wrapped = " ([CLS]/[SEP]-wrapped sequences)" if manifest["special_tokens_in_sequences"] else ""
    print(f"wrote {Path(args.output_dir) / 'manifest.json'} ({len(manifest['shards'])} shards{wrapped})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from alectra.storage.integrity import ShardError, content_problems, open_shard, scan_shard
    from alectra.storage.manifest import load_manifest

    manifest = load_manifest(args.dataset)
    root = Path(manifest["_dir"])
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    bad = 0
    for s in manifest["shards"]:  # everything, every time: no verification record is trusted here
        try:
            ds = open_shard(root, s)
            problems = content_problems(ds, s, scan_shard(ds), vocab_size)
        except ShardError as e:
            problems = [str(e)]
        bad += bool(problems)
        print(f"{s['prefix']}: {'OK' if not problems else 'BAD: ' + '; '.join(problems)}")
    print(f"{len(manifest['shards']) - bad}/{len(manifest['shards'])} shards OK")
    if bad:
        print(
            f"error: {bad} shard(s) failed verification; rebuild them "
            "(delete their .json record and rerun build)",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from alectra.storage.indexed import IndexedDataset
    from alectra.storage.manifest import load_manifest

    manifest = load_manifest(args.dataset)
    root = Path(manifest["_dir"])
    shards = [IndexedDataset(root / s["prefix"]) for s in manifest["shards"]]
    tok = manifest["tokenizer"]
    st = manifest.get("stats", {})
    print(
        f"dataset   {root}  ({manifest['format']}, dtype {manifest.get('dtype')}, "
        f"split {manifest.get('sentence_split')})"
    )
    print(
        f"tokenizer {tok['name_or_path']}  vocab {tok['vocab_size']}  "
        f"sha256 {tok['vocab_sha256'][:16]}  {tok['special_tokens']}"
    )
    print(
        f"shards {len(shards)}  documents {sum(d.num_documents for d in shards):,}  "
        f"sentences {sum(len(d) for d in shards):,}  tokens {sum(d.num_tokens for d in shards):,}  "
        f"(empty skipped {st.get('empty_documents', 0):,}, "
        f"invalid UTF-8 {st.get('invalid_utf8_documents', 0):,})"
    )
    lengths = np.concatenate([np.asarray(d.lengths) for d in shards]) if shards else np.zeros(0, np.int32)
    if len(lengths):
        edges = [1, 8, 16, 32, 64, 128, 256, 512, max(513, int(lengths.max()) + 1)]
        hist, _ = np.histogram(lengths, bins=edges)
        print(
            f"sentence length: mean {lengths.mean():.1f}  median {np.median(lengths):.0f}  "
            f"max {lengths.max()}"
        )
        for lo, hi, n in zip(edges[:-1], edges[1:], hist, strict=True):
            bar = "#" * int(round(50 * n / max(1, hist.max())))
            print(f"  [{lo:>4}, {hi:>4})  {n:>10,}  {bar}")
    if args.num_examples and shards:
        from alectra.storage.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer or tok["name_or_path"])
        for d in range(min(args.num_examples, shards[0].num_documents)):
            print(f"--- document {d} ---")
            for seq in shards[0].document(d)[: args.max_sentences]:
                print("  " + tokenizer.decode(np.asarray(seq).tolist()))
        _print_examples(shards[0], manifest, tokenizer, args.num_examples, args.example_length)
    return 0


def _print_examples(shard, manifest: dict, tokenizer, n: int, length: int) -> None:
    """The first ``n`` ELECTRA examples of the first shard, as training will see them (seed 0)."""
    from alectra.data.examples import ExampleBuilder, plan_shard

    wrapped = bool(manifest.get("special_tokens_in_sequences", False))
    lengths = np.maximum(np.asarray(shard.lengths) - (2 if wrapped else 0), 0)
    rows = plan_shard(lengths, np.asarray(shard.doc_idx), length, np.random.default_rng([0, 0]))[:n]
    builder = ExampleBuilder(
        [shard],
        max_seq_length=length,
        special_tokens=manifest["tokenizer"]["special_tokens"],
        strip_special_tokens=wrapped,
    )
    batch = builder.build_batch(np.concatenate([np.zeros((len(rows), 1), dtype=np.int64), rows], axis=1))
    for i, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"], strict=True)):
        print(f"--- example {i} (length {int(mask.sum())} of {length}) ---")
        print("  " + tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="tokenize a corpus into Megatron indexed shards + manifest.json")
    _add_source_args(b)
    b.add_argument(
        "--tokenizer", required=True, help="HF fast tokenizer name or folder (e.g. bert-base-uncased)"
    )
    b.add_argument("--output-dir", "-o", required=True, help="dataset folder to write")
    b.add_argument(
        "--sentence-split", choices=SPLIT_MODES, default="rules", help="rules (prose) or lines (one per line)"
    )
    b.add_argument(
        "--docs-per-shard", type=int, default=20000, help="input documents per shard (fixes boundaries)"
    )
    b.add_argument(
        "--workers", type=int, default=1, help="tokenizing processes (output does not depend on it)"
    )
    b.add_argument(
        "--num-shards", type=int, default=1, help="number of jobs sharing the build (SLURM array size)"
    )
    b.add_argument("--shard-index", type=int, default=0, help="this job's index (e.g. $SLURM_ARRAY_TASK_ID)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_build)

    t = sub.add_parser(
        "train-tokenizer",
        help="train a BERT-style uncased WordPiece vocabulary (the same corpus gives the same vocab.txt)",
    )
    _add_source_args(t)
    t.add_argument("--output-dir", "-o", required=True, help="tokenizer folder to write")
    t.add_argument("--vocab-size", type=int, default=30522, help="vocabulary size (BERT: 30522)")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair frequency to merge")
    t.set_defaults(func=cmd_train_tokenizer)

    i = sub.add_parser("inspect", help="counts, sentence-length histogram and the first documents decoded")
    i.add_argument("dataset", help="dataset folder (with manifest.json)")
    i.add_argument("--num-examples", type=int, default=2, help="documents to decode (0: none)")
    i.add_argument("--max-sentences", type=int, default=5, help="sentences shown per document")
    i.add_argument("--tokenizer", default=None, help="tokenizer for decoding (default: the manifest's)")
    i.add_argument("--example-length", type=int, default=128, help="max_seq_length of the examples shown")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser(
        "verify", help="check every shard against its index, the manifest counts and checksums"
    )
    v.add_argument("dataset", help="dataset folder (with manifest.json)")
    v.set_defaults(func=cmd_verify)

    g = sub.add_parser("import-megatron", help="write a manifest for shards made by Megatron-LM's tools")
    g.add_argument("prefix", nargs="+", help="Megatron dataset prefixes (path without .bin/.idx)")
    g.add_argument("--tokenizer", required=True, help="the tokenizer that made them (name or folder)")
    g.add_argument("--output-dir", "-o", required=True, help="folder for manifest.json (and cached plans)")
    g.set_defaults(func=cmd_import_megatron)

    m = sub.add_parser("merge", help="write manifest.json once all --num-shards jobs have finished")
    m.add_argument("output_dir", help="dataset folder the jobs wrote into")
    m.set_defaults(func=cmd_merge)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (DataPrepError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
