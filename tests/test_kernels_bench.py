"""benchmarks/bench_kernels.py, dry-run on CPU: the GPU-only timing code calls the kernels with their current
signatures (checked against the references, launch sweep included) at tiny shapes in the Triton interpreter,
with a stub in place of `triton.testing.do_bench`; and `--count-ops` reports one dispatched op per call.

A GPU hour is scarce: a signature change that broke the script would otherwise surface only there.
"""

import importlib.util
import pathlib

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_kernels.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Tiny shapes on the CPU (the interpreter costs ~25 ms per sampling row).
    monkeypatch.setattr(module, "DEVICE", "cpu")
    monkeypatch.setattr(module, "VOCAB", 61)
    monkeypatch.setattr(module, "RTD_SIZES", (3 * 423,))
    monkeypatch.setattr(module, "SAMPLING_ROWS", (11,))
    monkeypatch.setattr(module, "SWEEP_N", 2000)
    monkeypatch.setattr(module, "SWEEP_M", 5)
    monkeypatch.setattr(module, "RTD_CONFIGS", module.RTD_CONFIGS[:2])
    monkeypatch.setattr(module, "SAMPLING_CONFIGS", module.SAMPLING_CONFIGS[:1])
    return module


def _run_once(fn):
    """Stands in for do_bench: one call, a fixed 1 ms."""
    fn()
    return 1.0


def test_timing_code_runs_with_the_current_signatures(bench):
    rows = bench.bench_rtd(_run_once, torch.float32, 1.0)
    rows += bench.bench_sampling(_run_once, torch.float32, 1.0)
    assert len(rows) == 2 and all("| ok" in row for row in rows), rows
    sweep = bench.sweep(_run_once, torch.float32, 1.0)
    assert len(sweep) == 3 and all(row.startswith("| ") for row in sweep)


def test_count_ops_reports_one_dispatched_op_per_triton_call(bench, capsys):
    assert bench.main(["--count-ops"]) == 0
    table = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:5] for line in table.splitlines()[3:]}
    # forward dispatched, forward device ops, backward dispatched, backward device ops
    assert rows["sample_and_cross_entropy Triton, seed tensor + valid"] == ["1", "3", "1", "1"]
    assert rows["rtd_loss Triton"] == ["1", "2", "1", "1"]
    assert len(rows) == 7
