"""``build``: corpus -> tokenized Megatron indexed shards + ``manifest.json``.

Input documents are cut into chunks of ``docs_per_shard`` *input* documents; chunk k becomes
``shard_{k:05d}.{bin,idx}`` no matter which process writes it, so the output is byte-identical for any
``--workers``, MPI world size or ``--num-shards``. A shard is complete once its ``shard_*.json`` record
exists (written after the ``.bin``/``.idx`` renames); a rerun skips complete shards and rewrites the others.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alectra.storage.atomic import temporary_owner, write_json_atomic
from alectra.storage.indexed import IndexedDatasetWriter, token_dtype
from alectra.storage.manifest import FORMAT, MANIFEST_NAME, tokenizer_info
from alectra.storage.tokenizer import load_tokenizer
from data_prep.errors import DataPrepError
from data_prep.locking import BuildLock, die_with_parent, process_alive
from data_prep.sentences import SPLIT_MODES, split_sentences
from data_prep.sources import Chunk, Source

_ENCODE_BATCH_DOCS = 256  # documents per call into the Rust batch encoder (bounds memory of Encoding objects)


@dataclass(kw_only=True)
class BuildConfig:
    """Everything that decides the bytes of the output (plus how to parallelize, which does not)."""

    output_dir: Path
    """Folder for shards, records and ``manifest.json``."""
    tokenizer: str
    """Hugging Face fast tokenizer: hub name or local folder."""
    sentence_split: str = "rules"
    """``rules`` (rule-based prose splitter) or ``lines`` (one sentence per line, as ELECTRA for OWT)."""
    docs_per_shard: int = 20000
    """Input documents per output shard; fixes shard boundaries."""
    workers: int = 1
    """Tokenizing processes on this machine."""
    num_shards: int = 1
    """Independent jobs (SLURM array tasks) sharing the build; job i writes the shards k with k % n == i."""
    shard_index: int = 0
    """This job's index in ``[0, num_shards)``."""
    command: str = ""
    """The command line recorded in the manifest."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.sentence_split not in SPLIT_MODES:
            raise DataPrepError(
                f"--sentence-split {self.sentence_split!r}: choose one of {', '.join(SPLIT_MODES)}"
            )
        if self.docs_per_shard < 1:
            raise DataPrepError(f"--docs-per-shard {self.docs_per_shard}: must be >= 1")
        if self.workers < 1:
            raise DataPrepError(f"--workers {self.workers}: must be >= 1")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise DataPrepError(
                f"--shard-index {self.shard_index} / --num-shards {self.num_shards}: "
                "need 0 <= index < num-shards"
            )


def shard_prefix(k: int) -> str:
    return f"shard_{k:05d}"


# ---- worker side ---------------------------------------------------------------------------------------

_worker_state: dict = {}


def _init_worker(tokenizer_name: str, split_mode: str, dtype: str, parent_pid: int | None = None) -> None:
    if parent_pid is not None:  # a pool worker: never outlive (and keep writing after) a killed build
        die_with_parent(parent_pid)
    _worker_state.update(
        backend=load_tokenizer(tokenizer_name).backend_tokenizer, split=split_mode, dtype=np.dtype(dtype)
    )


def encode_documents(backend, documents: list[str], split_mode: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split each document into sentences and batch-encode all of them in the Rust core.

    Returns one ``(tokens (N,), lengths (S,))`` pair per document; sentences that encode to no token are
    dropped, and a document left with none comes back with ``S == 0``.
    """
    sentences: list[str] = []
    bounds = [0]
    for doc in documents:
        sentences += split_sentences(doc, split_mode)
        bounds.append(len(sentences))
    encodings = backend.encode_batch_fast(sentences, add_special_tokens=False) if sentences else []
    ids = [e.ids for e in encodings]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    flat = np.fromiter(
        itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum(dtype=np.int64))
    )
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        doc_lengths = lengths[a:b]
        out.append((flat[offsets[a] : offsets[b]], doc_lengths[doc_lengths > 0]))
    return out


def _write_shard(out_dir: str, chunk: Chunk, record_extra: dict) -> dict:
    """Tokenize one chunk and write its shard + record; runs in a worker (or inline)."""
    backend, split_mode, dtype = _worker_state["backend"], _worker_state["split"], _worker_state["dtype"]
    prefix = os.path.join(out_dir, shard_prefix(chunk.index))
    writer = IndexedDatasetWriter(prefix, dtype)
    empty = n_bytes = 0
    try:
        docs = chunk.documents or []
        for i in range(0, len(docs), _ENCODE_BATCH_DOCS):
            batch = docs[i : i + _ENCODE_BATCH_DOCS]
            n_bytes += sum(len(d.encode("utf-8")) for d in batch)
            for tokens, lengths in encode_documents(backend, batch, split_mode):
                if len(lengths) == 0:
                    empty += 1
                    continue
                writer.add_flat_document(tokens, lengths)
        counts = writer.finish()
    except BaseException:
        writer.abort()
        raise
    record = {
        "prefix": shard_prefix(chunk.index),
        "index": chunk.index,
        **counts,
        "input_documents": len(chunk.documents or []),
        "empty_documents": empty,
        "invalid_utf8_documents": chunk.invalid_utf8,
        "text_bytes": n_bytes,
        **record_extra,
    }
    write_json_atomic(prefix + ".json", record)
    return record


# ---- coordinator side ----------------------------------------------------------------------------------


def _fingerprint(cfg: BuildConfig, tok_info: dict, source: Source, dtype: np.dtype) -> dict:
    """What must match for shards of an earlier (interrupted) run to be reused."""
    return {
        "vocab_sha256": tok_info["vocab_sha256"],
        "special_tokens": tok_info["special_tokens"],
        "vocab_size": tok_info["vocab_size"],
        "sentence_split": cfg.sentence_split,
        "docs_per_shard": cfg.docs_per_shard,
        "dtype": dtype.name,
        "source": source.describe(),
        "max_documents": source.max_documents,
    }


def _check_output_dir(out: Path, fingerprint: dict, *, may_reset: bool) -> None:
    """Refuse to mix shards of different tokenizers/settings in one folder.

    A folder whose earlier build failed before finishing any non-empty shard (bad input, an empty corpus)
    holds nothing worth keeping: with ``may_reset`` (no other build can be writing) its claim is dropped, so
    the corrected command is accepted.
    """
    import json

    build_json = out / "build.json"
    if build_json.is_file():
        old = json.loads(build_json.read_text())
        diff = [k for k in fingerprint if old.get(k) != fingerprint[k]]
        if diff and may_reset and _holds_nothing(out):
            _reset(out)
            return
        if old.get("vocab_sha256") != fingerprint["vocab_sha256"]:
            raise DataPrepError(
                f"{out}: holds shards built with another tokenizer "
                f"(vocab sha256 {old.get('vocab_sha256', '?')[:12]}, "
                f"now {fingerprint['vocab_sha256'][:12]}); use a new --output-dir or delete this one"
            )
        if diff:
            raise DataPrepError(
                f"{out}: holds shards built with other settings ({', '.join(diff)} differ); "
                "use a new --output-dir or delete this one"
            )
    elif any(out.glob("shard_*.idx")) or (out / MANIFEST_NAME).is_file():
        raise DataPrepError(
            f"{out}: holds shards of an unknown build; use a new --output-dir or delete this one"
        )


def _holds_nothing(out: Path) -> bool:
    """No manifest and no finished shard with a document in it."""
    import json

    if (out / MANIFEST_NAME).is_file():
        return False
    return all(json.loads(r.read_text()).get("documents", 0) == 0 for r in out.glob("shard_*.json"))


def _reset(out: Path) -> None:
    """Delete a failed build's leftovers (empty or unfinished shards, parts, the claim)."""
    for pattern in ("shard_*", "part_*_of_*.json", "build.json"):
        for p in out.glob(pattern):
            p.unlink(missing_ok=True)


def _claim_output_dir(
    out: Path, fingerprint: dict, cfg: BuildConfig, world: int, rank: int, comm
) -> contextlib.AbstractContextManager:
    """Lock the output folder (`BuildLock`), check it, clean it and record this build in ``build.json``.

    Under MPI only rank 0 locks, checks and writes, for the whole world, then tells the others: were every
    rank to check on its own, a rank that looks after rank 0 wrote its first shard but before ``build.json``
    exists would take the folder for a foreign build (and the ranks that did not fail would wait for it
    forever). Rank 0 also removes the dead writers' temporary files of the world's shards before any rank
    starts writing.
    """
    error, lock = None, None
    if rank == 0:
        try:
            lock = BuildLock.acquire(out, num_shards=cfg.num_shards, shard_index=cfg.shard_index)
            _check_output_dir(out, fingerprint, may_reset=lock.exclusive)
            n_jobs = cfg.num_shards * world
            _remove_dead_temporaries(
                out, lambda k: (k % n_jobs) // world == cfg.shard_index, others=cfg.num_shards == 1
            )
            if not (out / "build.json").is_file():
                # tokenizer name kept apart: the same vocabulary from another path may resume the build
                write_json_atomic(out / "build.json", {**fingerprint, "tokenizer_name": cfg.tokenizer})
        except DataPrepError as exc:
            if lock is not None:
                lock.release()
            error = str(exc)
    if comm is not None:
        error = comm.bcast(error, root=0)
    if error is not None:
        raise DataPrepError(error)
    return lock if lock is not None else contextlib.nullcontext()


def _complete(out: Path, k: int, fingerprint: dict) -> dict | None:
    """The record of shard k if it was finished by an earlier run with the same settings."""
    import json

    rec_path = out / (shard_prefix(k) + ".json")
    if not rec_path.is_file():
        return None
    rec = json.loads(rec_path.read_text())
    prefix = out / shard_prefix(k)
    if rec.get("vocab_sha256") != fingerprint["vocab_sha256"]:
        return None
    if not (Path(str(prefix) + ".bin").is_file() and Path(str(prefix) + ".idx").is_file()):
        return None
    return rec


def _remove_dead_temporaries(out: Path, shard_wanted, *, others: bool = False) -> None:
    """Delete temporary files whose writer is dead: those of shards ``shard_wanted(k)`` and, with ``others``
    (whole-folder build, folder locked), any other. A live writer's file is never touched; its pid is in
    the name (`alectra.storage.atomic.temporary_path`)."""
    for tmp in out.iterdir():
        owner = temporary_owner(tmp.name)
        if owner is None or process_alive(owner):
            continue
        if tmp.name.startswith(".shard_"):
            if not shard_wanted(int(tmp.name[len(".shard_") :].split(".")[0])):
                continue
        elif not others:
            continue
        tmp.unlink(missing_ok=True)


def _mpi_rank_world() -> tuple[int, int, object | None]:
    """(rank, world, comm) when launched by mpirun/srun with MPI, else (0, 1, None)."""
    if not any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return 0, 1, None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm.Get_rank(), comm.Get_size(), (comm if comm.Get_size() > 1 else None)


def build(cfg: BuildConfig, source: Source) -> dict | None:
    """Run (or resume) a build; returns the manifest once every shard exists, else ``None``."""

    rank, world, comm = _mpi_rank_world()
    n_jobs, job = cfg.num_shards * world, cfg.shard_index * world + rank
    tok = load_tokenizer(cfg.tokenizer)
    tok_info = tokenizer_info(tok, cfg.tokenizer)
    dtype = token_dtype(tok_info["vocab_size"])
    fingerprint = _fingerprint(cfg, tok_info, source, dtype)
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    with _claim_output_dir(out, fingerprint, cfg, world, rank, comm):  # released when the build ends
        records: dict[int, dict] = {}
        total_bytes = source.total_bytes()
        # rank 0 sees only its own share of the input: size the bar (and ETA) to that share
        bar = _progress(cfg.progress and rank == 0, None if total_bytes is None else total_bytes // n_jobs)
        started = time.perf_counter()
        record_extra = {"vocab_sha256": fingerprint["vocab_sha256"]}
        pool = None
        if cfg.workers > 1:
            # fork: workers inherit nothing big; each loads its own tokenizer once (initializer).
            pool = mp.get_context("fork").Pool(
                cfg.workers, _init_worker, (cfg.tokenizer, cfg.sentence_split, dtype.name, os.getpid())
            )
        else:
            _init_worker(cfg.tokenizer, cfg.sentence_split, dtype.name)
        pending: deque = deque()

        def collect(rec: dict) -> None:
            records[rec["index"]] = rec
            bar.update(rec)

        n_chunks = 0
        try:
            for chunk in source.chunks(cfg.docs_per_shard, lambda k: k % n_jobs == job):
                n_chunks = chunk.index + 1
                if chunk.documents is None:
                    continue
                done = _complete(out, chunk.index, fingerprint)
                if done is not None:
                    collect(done)
                    continue
                if pool is None:
                    collect(_write_shard(str(out), chunk, record_extra))
                    continue
                pending.append(pool.apply_async(_write_shard, (str(out), chunk, record_extra)))
                while len(pending) > cfg.workers:  # bound memory: one chunk per worker plus one queued
                    collect(pending.popleft().get())
            while pending:
                collect(pending.popleft().get())
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            bar.close()
            _remove_dead_temporaries(out, lambda k: k % n_jobs == job)  # e.g. of the workers just terminated
        if n_chunks == 0:
            raise DataPrepError(f"no documents in {source.describe()}; check the input")
        elapsed = time.perf_counter() - started
        skipped = source.binary_files_skipped
        job_part = {"num_chunks": n_chunks, "jobs": n_jobs, "binary_files_skipped": skipped}
        write_json_atomic(out / f"part_{job:05d}_of_{n_jobs:05d}.json", job_part)
        if comm is not None:
            gathered = comm.gather(list(records.values()), root=0)  # also the barrier before the manifest
            if rank != 0:
                return None
            records = {r["index"]: r for part in gathered for r in part}
        manifest = merge(out, command=cfg.command, quiet=True)
        who = "" if manifest is not None else f" by job {job} of {n_jobs}"
        _print_summary(records.values(), skipped, elapsed, who, file=sys.stderr)
        return manifest


def merge(
    out: Path,
    *,
    command: str = "",
    quiet: bool = False,
) -> dict | None:
    """Write ``manifest.json`` from the shard records once every job's part is there.

    Returns the manifest, or ``None`` (with a message unless ``quiet``) while parts are still missing.
    """
    import json

    out = Path(out)
    parts = sorted(out.glob("part_*_of_*.json"))
    if not parts:
        raise DataPrepError(f"{out}: no build parts found; run `python -m data_prep build` into it first")
    part_info = [json.loads(p.read_text()) for p in parts]
    n_jobs = part_info[0]["jobs"]
    n_chunks = max(p["num_chunks"] for p in part_info)
    if len(parts) < n_jobs:
        if not quiet:
            raise DataPrepError(
                f"{out}: {len(parts)} of {n_jobs} jobs have finished; rerun merge when all are done"
            )
        return None
    fingerprint = json.loads((out / "build.json").read_text())
    shards = []
    for k in range(n_chunks):
        rec = _complete(out, k, fingerprint)
        if rec is None:
            raise DataPrepError(
                f"{out}: shard {shard_prefix(k)} is missing or incomplete; rerun the build to finish it"
            )
        shards.append(rec)
    stats = _totals(shards)
    if stats["documents"] == 0:
        raise DataPrepError(
            f"no documents in {fingerprint['source']}: {stats['input_documents']} input document(s), "
            "all empty; check the input (or --json-key)"
        )
    # every job reads the whole input, so each part saw the same binary files
    stats["binary_files_skipped"] = max(int(p.get("binary_files_skipped", 0)) for p in part_info)
    if not command and (out / MANIFEST_NAME).is_file():
        command = json.loads((out / MANIFEST_NAME).read_text()).get("command", "")
    tok_info = {
        "name_or_path": fingerprint["tokenizer_name"],
        "vocab_size": fingerprint["vocab_size"],
        "vocab_sha256": fingerprint["vocab_sha256"],
        "special_tokens": fingerprint["special_tokens"],
    }
    keys = ("prefix", "sequences", "documents", "tokens", "bin_sha256", "idx_sha256")
    manifest = {
        "format": FORMAT,
        "tokenizer": tok_info,
        "dtype": fingerprint["dtype"],
        "sentence_split": fingerprint["sentence_split"],
        "docs_per_shard": fingerprint["docs_per_shard"],
        "special_tokens_in_sequences": False,
        "source": fingerprint["source"],
        "shards": [{k: r[k] for k in keys} for r in shards],
        "stats": stats,
        "command": command,
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def _totals(records) -> dict:
    keys = (
        "input_documents",
        "empty_documents",
        "invalid_utf8_documents",
        "documents",
        "sequences",
        "tokens",
    )
    totals = {k: 0 for k in keys + ("text_bytes",)}
    for r in records:
        for k in totals:
            totals[k] += int(r.get(k, 0))
    return totals


def _print_summary(records, binary_files_skipped: int, elapsed: float, who: str, *, file) -> None:
    t = _totals(list(records))
    mb = t["text_bytes"] / 1e6
    binary = f", {binary_files_skipped:,} binary file(s) skipped" if binary_files_skipped else ""
    print(
        f"built{who} {t['documents']:,} documents ({t['empty_documents']:,} empty skipped, "
        f"{t['invalid_utf8_documents']:,} with invalid UTF-8 replaced{binary}), "
        f"{t['sequences']:,} sentences, "
        f"{t['tokens']:,} tokens from {mb:,.1f} MB in {elapsed:,.1f} s "
        f"({mb / max(elapsed, 1e-9):,.2f} MB/s, {t['tokens'] / max(elapsed, 1e-9):,.0f} tokens/s)",
        file=file,
    )


class _progress:
    """tqdm bar in bytes (ETA when the input size is known) with documents/s and tokens/s."""

    def __init__(self, enabled: bool, total_bytes: int | None) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from tqdm import tqdm

        self.start = time.perf_counter()
        self.docs = self.tokens = 0
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="build", file=sys.stderr)

    def update(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.docs += rec["input_documents"]
        self.tokens += rec["tokens"]
        dt = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tok/s", refresh=False
        )
        self.bar.update(rec.get("text_bytes", 0))

    def close(self) -> None:
        if self.enabled:
            self.bar.close()


def import_megatron(prefixes: list[str], tokenizer_name: str, out: Path, *, command: str = "") -> dict:
    """Write a ``manifest.json`` in ``out`` for ``.bin``/``.idx`` pairs written by Megatron-LM's tools.

    The shards stay where they are (the manifest holds their absolute prefixes). Megatron wraps every
    sequence as ``[CLS] ... [SEP]``; that is detected from the first sequence and recorded, and the example
    builder then drops those tokens before packing.
    """
    from alectra.storage.indexed import IndexedDataset, file_sha256

    tok_info = tokenizer_info(load_tokenizer(tokenizer_name), tokenizer_name)
    special = tok_info["special_tokens"]
    shards, wrapped = [], []
    for prefix in prefixes:
        prefix = str(Path(prefix).resolve()).removesuffix(".bin").removesuffix(".idx")
        ds = IndexedDataset(prefix)
        if len(ds):
            top = ds[0]
            wrapped.append(len(top) >= 2 and int(top[0]) == special["cls"] and int(top[-1]) == special["sep"])
        if len(ds) and int(np.max(ds.tokens)) >= tok_info["vocab_size"]:
            raise DataPrepError(
                f"{prefix}: token ids beyond the vocabulary of {tokenizer_name!r}; wrong tokenizer?"
            )
        shards.append(
            {
                "prefix": prefix,
                "sequences": len(ds),
                "documents": ds.num_documents,
                "tokens": ds.num_tokens,
                "bin_sha256": file_sha256(prefix + ".bin"),
                "idx_sha256": file_sha256(prefix + ".idx"),
            }
        )
    if len(set(wrapped)) > 1:
        raise DataPrepError(
            "some shards wrap sequences in [CLS]/[SEP] and some do not; import them separately"
        )
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "tokenizer": tok_info,
        "dtype": IndexedDataset(shards[0]["prefix"]).dtype.name if shards else "uint16",
        "sentence_split": "unknown (Megatron-LM preprocess_data.py)",
        "special_tokens_in_sequences": bool(wrapped and wrapped[0]),
        "source": "megatron: " + ", ".join(s["prefix"] for s in shards),
        "shards": shards,
        "stats": {k: sum(s[k] for s in shards) for k in ("documents", "sequences", "tokens")},
        "command": command,
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest
