"""Fault injection on the data path (issue 14, items 3 and 4): damaged shards at training time, data_prep
killed, run twice at once, or fed an empty, binary or broken corpus.

Each test reproduces a defect of the code before the fix (named in its docstring) on a tiny corpus.
Processes are waited on by condition with generous deadlines, never by sleeping a fixed time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from alectra.storage import load_manifest
from data_prep.cli import main as data_prep_main
from tests.test_data_examples import write_dataset

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "alectra" / "pretrain.py"
DEADLINE = 180  # seconds; a run that has not exited by then is hanging


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _wait(predicate, what: str, proc: subprocess.Popen | None = None, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ---- damaged shards at training time (item 3) ---------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from data_prep import prepare_demo

    out = prepare_demo(tmp_path_factory.mktemp("data") / "demo", vocab_size=1000, max_documents=150)
    for f in out.glob("shard_*.[bi][id][nx]"):  # written long ago, as a real dataset's files are
        old = f.stat().st_mtime_ns - 60 * 10**9
        os.utime(f, ns=(old, old))
    return out


def _copy(demo: Path, dest: Path) -> Path:
    shutil.copytree(demo, dest, ignore=shutil.ignore_patterns("plans", "verified.*"))
    return dest


def _pretrain(data: Path, out: Path) -> tuple[int, str, float]:
    """Run pretrain.py on ``data`` with one DataLoader worker (the setting that hung); (exit, output, s)."""
    args = {
        "output_dir": out,
        "data.paths": f"[{data}]",
        "data.num_workers": 1,
        "data.max_seq_length": 32,
        "train.steps": 2,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 4,
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
    }
    cmd = [sys.executable, str(PRETRAIN), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json")]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        pytest.fail(f"pretrain.py still running after {DEADLINE} s on a damaged shard (hang)")
    return proc.returncode, output, time.monotonic() - started


def _one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in output and len(errors) == 1, output[-4000:]
    return errors[0]


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_shard_stops_training_with_one_line(demo, tmp_path, damage):
    """Before: a truncated shard gave a traceback and exit 1; same-size corruption an IndexError in the
    training loop, then a hang (the DataLoader worker kept the process alive)."""
    from alectra.data import build_pretraining_datasets

    data = _copy(demo, tmp_path / "data")
    kw = dict(max_seq_length=32, seed=1, valid_fraction=0.05, num_train_samples=None)
    build_pretraining_datasets([str(data)], None, **kw)  # opened (verified, recorded) while intact
    shard = data / "shard_00000.bin"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        if damage == "corrupt":  # same size, every id 65535: out of the vocabulary in the first batch
            f.write(b"\xff" * size)
        else:
            f.truncate(size - 2)
    code, output, seconds = _pretrain(data, tmp_path / "run")
    line = _one_error_line(output)
    assert code == 2 and "shard_00000.bin" in line, output[-4000:]
    assert ("checksum mismatch" if damage == "corrupt" else "truncated") in line
    print(f"{damage}: exit {code} after {seconds:.1f} s: {line}")


def test_token_id_out_of_range_names_shard_and_offset(tmp_path):
    """Before: ids beyond the vocabulary were only found by the embedding lookup (IndexError, then the
    hang); here the checksums match, so only the range check can catch it."""
    from alectra.data import build_pretraining_datasets

    rng = np.random.default_rng(0)
    docs = [[rng.integers(5, 1000, size=20).tolist() for _ in range(4)] for _ in range(30)]
    docs[17][2][5] = 1500  # token offset 17 * 80 + 2 * 20 + 5 = 1405, sequence 17 * 4 + 2 = 70
    data = write_dataset(tmp_path / "ds", docs)  # vocabulary of 1000 ids
    kw = dict(max_seq_length=32, seed=1, valid_fraction=0.1, num_train_samples=None)
    with pytest.raises(ValueError) as info:
        build_pretraining_datasets([str(data)], None, **kw)
    msg = str(info.value)
    assert "shard_00000.bin: token id 1500 at token offset 1405" in msg and "sequence 70" in msg, msg
    assert "\n" not in msg
    assert data_prep_main(["verify", str(data)]) == 1  # verify says the same


# ---- data_prep (item 4) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    from data_prep.tokenizer import train_tokenizer

    return str(train_tokenizer(_docs(200), tmp_path_factory.mktemp("tok") / "tok", vocab_size=800))


def _docs(n: int) -> list[str]:
    from pydoc_data.topics import topics

    paras = [
        " ".join(p.split()) for t in sorted(topics) for p in topics[t].split("\n\n") if len(p.split()) > 5
    ]
    return [" ".join(paras[i : i + 3]) for i in range(0, 3 * n, 3)][:n]


def _jsonl(path: Path, n: int) -> Path:
    docs = _docs(200)
    path.write_text("".join(json.dumps({"text": docs[i % len(docs)]}) + "\n" for i in range(n)))
    return path


def _shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard_*.[bi][id][nx]"))}


def _build_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "data_prep", "build", "--no-progress", *map(str, args)]


def _build(capsys, *args) -> tuple[int, str]:
    code = data_prep_main(["build", "--no-progress", *map(str, args)])
    return code, capsys.readouterr().err


def test_killed_build_leaves_no_worker_and_reruns_byte_identical(tmp_path, tok_dir, capsys):
    """Before: after `kill -9` of the build's parent, its pool workers went on writing the shards they
    had started (and renamed them into place) while the rerun was already writing the same shards."""
    corpus = _jsonl(tmp_path / "big.jsonl", 4000)
    args = ["--input", corpus, "--tokenizer", tok_dir, "--docs-per-shard", 1000, "--workers", 2]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*_build_cmd(*args), "-o", out], env=_env(), cwd=ROOT, start_new_session=True)
    workers: list[psutil.Process] = []

    def final_files() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}

    try:
        # both workers in the middle of a shard (a second or more of work each)
        _wait(lambda: len(list(out.glob(".shard_*.bin.tmp-*"))) >= 2, "two shards being written", proc)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)  # the parent only, as `kill -9 <pid>` does
        proc.wait()
        at_kill = final_files()

        def workers_gone() -> bool:
            return all(not w.is_running() or w.status() == psutil.STATUS_ZOMBIE for w in workers)

        _wait(workers_gone, "the workers to end", timeout=DEADLINE)
        assert final_files() == at_kill, "workers went on writing shards after their parent was killed"
        code, err = _build(capsys, *args, "-o", out)  # at once, as a user would
        assert code == 0, err
    finally:
        for w in workers:
            if w.is_running():
                w.kill()
        _kill_group(proc)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert _build(capsys, *args, "-o", tmp_path / "clean")[0] == 0
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "clean")
    assert load_manifest(out)["shards"] == load_manifest(tmp_path / "clean")["shards"]


def test_concurrent_builds_are_refused(tmp_path, tok_dir, capsys):
    """Before: a second build into the same folder ran alongside the first; now it is refused while the
    first holds the folder, and jobs of one array build still run side by side."""
    corpus = _jsonl(tmp_path / "c.jsonl", 3000)  # seconds of work: the test stops it well before the end
    common = ["--input", corpus, "--tokenizer", tok_dir, "--docs-per-shard", 300]

    def stopped_build(out: Path, *extra) -> subprocess.Popen:
        """A build started in a subprocess and frozen (SIGSTOP) once it holds the folder's lock."""
        proc = subprocess.Popen(_build_cmd(*common, "-o", out, *extra), env=_env(), cwd=ROOT)

        def holds_lock() -> bool:
            try:
                return json.loads((out / "build.lock").read_text()).get("pid") == proc.pid
            except (OSError, ValueError):
                return False

        try:
            _wait(holds_lock, "the first build to lock the folder", proc)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.send_signal(signal.SIGSTOP)
        # a build that ended before the signal (a very loaded machine) would make the test meaningless
        assert proc.poll() is None, f"the build ended (exit {proc.returncode}) before it could be stopped"
        return proc

    def resume(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=DEADLINE) == 0

    out = tmp_path / "one"
    first = stopped_build(out)
    try:
        code, err = _build(capsys, *common, "-o", out)
        assert code == 2 and f"another build is writing into this folder (pid {first.pid}" in err, err
    finally:
        resume(first)
    assert _build(capsys, *common, "-o", out)[0] == 0  # released at its end: the rerun is accepted

    arr = tmp_path / "array"
    job0 = stopped_build(arr, "--num-shards", 2, "--shard-index", 0)
    try:
        assert _build(capsys, *common, "-o", arr, "--num-shards", 2, "--shard-index", 1)[0] == 0
        code, err = _build(capsys, *common, "-o", arr, "--num-shards", 2, "--shard-index", 0)
        assert code == 2 and "job --shard-index 0 of --num-shards 2 is already running" in err, err
        code, err = _build(capsys, *common, "-o", arr)
        assert code == 2 and "another build is writing into this folder" in err, err
    finally:
        resume(job0)
    assert load_manifest(arr)["shards"] == load_manifest(out)["shards"]  # the last job merged


def test_build_without_file_locks_goes_on_with_a_warning(tmp_path, tok_dir, capsys, monkeypatch):
    """A network file system without fcntl locks (ENOLCK): the build is not stopped, it says so."""
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    code, err = _build(
        capsys, "--input", _jsonl(tmp_path / "c.jsonl", 20), "--tokenizer", tok_dir, "-o", tmp_path / "o"
    )
    assert code == 0 and "cannot lock (No locks available)" in err, err


def test_empty_corpus_is_an_error(tmp_path, tok_dir, capsys):
    """Before: exit 0 with 0 shards, and training on it ended in a traceback."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, err = _build(capsys, "--input", empty, "--tokenizer", tok_dir, "-o", tmp_path / "a")
    assert code == 2 and err.strip() == f"error: no documents in {empty}; check the input"
    blank = tmp_path / "blank.jsonl"
    blank.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("", "  ", "\n")))
    code, err = _build(capsys, "--input", blank, "--tokenizer", tok_dir, "-o", tmp_path / "b")
    assert code == 2 and "no documents in" in err and "3 input document(s), all empty" in err, err
    assert len(err.strip().splitlines()) == 1
    # the folder of a build that found nothing takes the corrected input
    good = _jsonl(tmp_path / "good.jsonl", 50)
    assert _build(capsys, "--input", good, "--tokenizer", tok_dir, "-o", tmp_path / "b")[0] == 0
    assert load_manifest(tmp_path / "b")["stats"]["documents"] == 50


def test_binary_input_is_an_error_or_skipped_on_request(tmp_path, tok_dir, capsys):
    """Before: a binary file read as .txt was accepted without a word."""
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    good = _jsonl(tmp_path / "in" / "b_good.jsonl", 40)
    binary = tmp_path / "in" / "a_image.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    latin1 = tmp_path / "in" / "c_latin1.txt"  # text with a few invalid bytes stays text
    latin1.write_bytes("Caf\xe9 cr\xe8me and other words of plain English text here.\n".encode("latin-1"))
    common = ["--tokenizer", tok_dir, "--docs-per-shard", 20]
    code, err = _build(capsys, "--input", tmp_path / "in", *common, "-o", tmp_path / "a")
    assert code == 2 and err.startswith(f"error: {binary}: looks binary") and "--skip-binary-files" in err, (
        err
    )
    code, err = _build(
        capsys, "--input", tmp_path / "in", *common, "-o", tmp_path / "a", "--skip-binary-files"
    )
    assert code == 0 and "1 binary file(s) skipped" in err, err
    assert load_manifest(tmp_path / "a")["stats"]["binary_files_skipped"] == 1
    ref = ["--tokenizer", tok_dir, "--docs-per-shard", 20, "-o", tmp_path / "ref"]
    assert _build(capsys, "--input", good, latin1, *ref)[0] == 0
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "ref")


def test_failed_build_folder_accepts_the_corrected_command(tmp_path, tok_dir, capsys):
    """Before: the failed build left build.json, and the folder refused the corrected input as "holds
    shards built with other settings" although it held none."""
    docs = _docs(60)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:30]) + "{oops\n")
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    common = ["--tokenizer", tok_dir, "--docs-per-shard", 100]
    code, err = _build(capsys, "--input", broken, *common, "-o", tmp_path / "out")
    assert code == 2 and "broken.jsonl:31: invalid JSON" in err
    code, err = _build(capsys, "--input", fixed, *common, "-o", tmp_path / "out")
    assert code == 0, err
    assert _build(capsys, "--input", fixed, *common, "-o", tmp_path / "clean")[0] == 0
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "clean")
    # a folder that holds finished shards of other settings is still refused
    code, err = _build(
        capsys, "--input", broken, "--tokenizer", tok_dir, "--docs-per-shard", 10, "-o", tmp_path / "out"
    )
    assert code == 2 and "other settings" in err
