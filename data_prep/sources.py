"""Corpus sources: local files (text / JSON Lines / Parquet, gzip or zstd), Hugging Face datasets, the demo.

Every source yields raw documents in a fixed order and groups them into chunks of ``docs_per_chunk`` input
documents (empty ones included), so chunk -- and therefore shard -- boundaries depend only on the input, never
on how many workers or ranks process it.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.errors import DataPrepError

TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".zst")
TEXT_MODES = ("blank-lines", "file")
BINARY_SAMPLE_BYTES = 8192  # git and grep look at the first 8 KB too
BINARY_INVALID_FRACTION = 0.3


def looks_binary(sample: bytes) -> bool:
    """Whether the start of a file is not text: a NUL byte, or more than 30 % of it invalid UTF-8
    (a few stray bytes in real text are replaced and counted instead)."""
    if b"\x00" in sample:
        return True
    text = sample.decode("utf-8", errors="replace")
    invalid = text.count("\ufffd") - text[-1:].count("\ufffd")  # a character cut at the sample's end
    return invalid > BINARY_INVALID_FRACTION * max(1, len(text))


@dataclass(kw_only=True)
class Chunk:
    """A run of consecutive input documents that becomes one output shard."""

    index: int
    """Position of the chunk in the input (shard number)."""
    documents: list[str] | None
    """The raw documents; ``None`` when the caller did not want this chunk (not read/decoded)."""
    invalid_utf8: int = 0
    """Documents of this chunk in which invalid UTF-8 was replaced with U+FFFD."""


@dataclass(kw_only=True)
class _Counter:
    invalid_utf8: int = 0
    binary_files: int = 0


@dataclass(kw_only=True)
class Source:
    """Base: subclasses implement ``documents()``; ``chunks()`` groups them."""

    max_documents: int | None = None
    """Stop after this many input documents (``None``: all)."""
    _counter: _Counter = field(default_factory=_Counter, repr=False)

    def documents(self) -> Iterator[str]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def total_bytes(self) -> int | None:
        """Input size for the progress ETA, when known."""
        return None

    @property
    def binary_files_skipped(self) -> int:
        """Input files skipped as binary so far (`FileSource` with ``skip_binary``)."""
        return self._counter.binary_files

    def chunks(self, docs_per_chunk: int, wanted: Callable[[int], bool]) -> Iterator[Chunk]:
        """Chunks of ``docs_per_chunk`` input documents; those not ``wanted`` come without their documents."""
        docs: list[str] = []
        k = 0
        before = 0
        for n, doc in enumerate(self.documents()):
            if self.max_documents is not None and n >= self.max_documents:
                break
            docs.append(doc)
            if len(docs) == docs_per_chunk:
                yield self._chunk(k, docs, wanted, before)
                before = self._counter.invalid_utf8
                docs, k = [], k + 1
        if docs:
            yield self._chunk(k, docs, wanted, before)

    def _chunk(self, k: int, docs: list[str], wanted: Callable[[int], bool], before: int) -> Chunk:
        if not wanted(k):
            return Chunk(index=k, documents=None)
        return Chunk(index=k, documents=docs, invalid_utf8=self._counter.invalid_utf8 - before)

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self._counter.invalid_utf8 += 1
            return raw.decode("utf-8", errors="replace")


@dataclass(kw_only=True)
class DemoSource(Source):
    """The built-in demo corpus (``data_prep.demo``)."""

    def documents(self) -> Iterator[str]:
        from data_prep.demo import demo_documents

        return demo_documents()

    def describe(self) -> str:
        return "demo (pydoc topics + standard-library docstrings)"


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _supported(path: Path) -> bool:
    return _base_suffix(path) in TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by ``inputs`` (files, directories searched recursively, globs), in a stable order."""
    files: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if any(c in spec for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataPrepError(f"{spec}: the glob matches no file")
            files += matches
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _supported(f))
            if not found:
                raise DataPrepError(f"{spec}: the folder holds no .txt/.jsonl/.json/.parquet(.gz/.zst) file")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataPrepError(f"{spec}: no such file or folder")
    for f in files:
        if not _supported(f):
            raise DataPrepError(
                f"{f}: unknown file type; use .txt, .jsonl, .json or .parquet "
                "(text/JSON may end in .gz or .zst)"
            )
    return files


def _open_binary(path: Path) -> io.BufferedIOBase:
    try:
        suffix = path.suffix.lower()
        if suffix == ".gz":
            return gzip.open(path, "rb")
        if suffix == ".zst":
            import zstandard

            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
        return open(path, "rb")
    except OSError as e:
        raise DataPrepError(f"{path}: cannot read ({e.strerror or e}); check the path and permissions") from e


@dataclass(kw_only=True)
class FileSource(Source):
    """Local files: plain text, JSON Lines, Parquet; gzip/zstd-compressed text and JSON."""

    paths: list[Path]
    """Input files, in reading order (see ``expand_inputs``)."""
    json_key: str = "text"
    """Field of each JSON object / Parquet column that holds the document."""
    text_mode: str = "blank-lines"
    """Plain text: ``blank-lines`` (blank lines separate documents) or ``file`` (one document per file)."""
    skip_binary: bool = False
    """Skip (and count) text/JSON files that look binary (`looks_binary`) instead of stopping at them."""

    def __post_init__(self) -> None:
        if self.text_mode not in TEXT_MODES:
            raise DataPrepError(f"--text-mode {self.text_mode!r}: choose one of {', '.join(TEXT_MODES)}")
        if not self.paths:
            raise DataPrepError("no input files; pass --input FILE|DIR|GLOB")

    def describe(self) -> str:
        return ", ".join(str(p) for p in self.paths)

    def total_bytes(self) -> int | None:
        if any(p.suffix.lower() in COMPRESSED_SUFFIXES or _base_suffix(p) == ".parquet" for p in self.paths):
            return None
        return sum(p.stat().st_size for p in self.paths)

    def documents(self) -> Iterator[str]:
        for path in self.paths:
            kind = _base_suffix(path)
            try:
                if kind not in PARQUET_SUFFIXES and self._binary(path):
                    continue
                if kind in PARQUET_SUFFIXES:
                    yield from self._parquet(path)
                elif kind in JSON_SUFFIXES:
                    yield from self._jsonl(path)
                else:
                    yield from self._text(path)
            except (OSError, EOFError, zlib.error, _zstd_error()) as e:
                raise DataPrepError(f"{path}: cannot read ({e}); the file is unreadable or corrupt") from e

    def _binary(self, path: Path) -> bool:
        """True for a binary file to skip; `DataPrepError` for one not to (text and JSON inputs only)."""
        with _open_binary(path) as f:
            if not looks_binary(f.read(BINARY_SAMPLE_BYTES)):
                return False
        if not self.skip_binary:
            raise DataPrepError(
                f"{path}: looks binary (NUL bytes or mostly invalid UTF-8), not text; remove it from --input "
                "or pass --skip-binary-files"
            )
        self._counter.binary_files += 1
        return True

    def _text(self, path: Path) -> Iterator[str]:
        with _open_binary(path) as f:
            if self.text_mode == "file":
                yield self._decode(f.read())
                return
            lines: list[bytes] = []
            for line in f:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield self._decode(b"".join(lines))
                    lines = []
            if lines:
                yield self._decode(b"".join(lines))

    def _jsonl(self, path: Path) -> Iterator[str]:
        with _open_binary(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(self._decode(line))
                except json.JSONDecodeError as e:
                    raise DataPrepError(
                        f"{path}:{lineno}: invalid JSON ({e.msg}); expected one object per line"
                    ) from e
                if not isinstance(obj, dict) or self.json_key not in obj:
                    keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
                    raise DataPrepError(
                        f"{path}:{lineno}: no key {self.json_key!r} (found: {keys}); "
                        "pass --json-key with the text field"
                    )
                text = obj[self.json_key]
                yield text if isinstance(text, str) else ""

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses for corrupt files
            raise DataPrepError(f"{path}: not a readable Parquet file ({e})") from e
        if self.json_key not in pf.schema_arrow.names:
            raise DataPrepError(
                f"{path}: no column {self.json_key!r} "
                f"(found: {', '.join(pf.schema_arrow.names)}); pass --json-key"
            )
        for batch in pf.iter_batches(columns=[self.json_key], batch_size=4096):
            for text in batch.column(0).to_pylist():
                yield text if isinstance(text, str) else ""


@dataclass(kw_only=True)
class HFSource(Source):
    """A Hugging Face dataset by hub name (streamed or not) or a folder saved with ``save_to_disk``."""

    name: str
    """Hub name (``Skylion007/openwebtext``), a builder (``parquet``/``json``) or a saved dataset folder."""
    config: str | None = None
    """Dataset configuration name."""
    split: str = "train"
    """Split to read."""
    streaming: bool = False
    """Stream instead of downloading the whole dataset first."""
    data_files: list[str] | None = None
    """Files for the generic builders (``parquet``, ``json``, ``text``)."""
    text_key: str = "text"
    """Column that holds the document."""

    def describe(self) -> str:
        extra = f" data_files={self.data_files}" if self.data_files else ""
        return f"hf:{self.name} config={self.config} split={self.split} streaming={self.streaming}{extra}"

    def _load(self):
        import datasets

        try:
            if Path(self.name).is_dir() and not self.data_files:
                ds = datasets.load_from_disk(self.name)
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise DataPrepError(f"{self.name}: no split {self.split!r} (found: {', '.join(ds)})")
                    ds = ds[self.split]
                if self.streaming:
                    ds = ds.to_iterable_dataset()
            else:
                ds = datasets.load_dataset(
                    self.name,
                    self.config,
                    split=self.split,
                    streaming=self.streaming,
                    data_files=self.data_files,
                )
        except DataPrepError:
            raise
        except (
            Exception
        ) as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            offline = " (offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)" if _offline() else ""
            raise DataPrepError(
                f"cannot load Hugging Face dataset {self.name!r}{offline}: {first}; "
                "check the name, or pass local files"
            ) from e
        names = ds.column_names
        if names is not None and self.text_key not in names:
            raise DataPrepError(
                f"dataset {self.name!r} has no column {self.text_key!r} "
                f"(found: {', '.join(names)}); pass --json-key"
            )
        return ds

    def documents(self) -> Iterator[str]:
        ds = self._load()
        for row in ds.select_columns([self.text_key]) if not self.streaming else ds:
            if self.text_key not in row:
                raise DataPrepError(
                    f"dataset {self.name!r}: a row has no {self.text_key!r} field; pass --json-key"
                )
            text = row[self.text_key]
            yield text if isinstance(text, str) else ""


def _zstd_error() -> type[Exception]:
    import zstandard

    return zstandard.ZstdError


def _offline() -> bool:
    return any(
        os.environ.get(v, "0") not in ("0", "", "false") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
