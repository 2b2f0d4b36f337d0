"""Every kernel specialisation compiles for sm_80 and sm_90 without a GPU, with no register spills.

Runs `python -m kernels.compile_check --json` in a subprocess: real compilation needs TRITON_INTERPRET unset
before triton is imported, while this test session has it set (tests/conftest.py).
"""

import json
import os
import subprocess
import sys

from tests import waiting

# Not imported from kernels.compile_check: importing it here, after triton was imported in interpreter mode,
# is exactly what it refuses.
CAPABILITIES = (80, 90)
LOGIT_DTYPES = ("fp32", "bf16", "fp16")


def test_all_kernels_compile_for_sm80_sm90_without_spills():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=waiting.deadline(300),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    compiled = {(row["kernel"], row["sm"]) for row in rows}
    for dtype in LOGIT_DTYPES:
        for sm in CAPABILITIES:
            assert (f"rtd_loss[{dtype}]", sm) in compiled
            assert (f"rtd_loss_bwd[{dtype}]", sm) in compiled
            assert (f"sample_ce[{dtype},scatter]", sm) in compiled
            assert (f"sample_ce[{dtype},valid,scatter]", sm) in compiled
    for sm in CAPABILITIES:
        assert ("rtd_loss_finish", sm) in compiled
        assert ("sample_ce_finish", sm) in compiled
        assert ("sample_ce_finish[valid]", sm) in compiled
    for row in rows:
        assert row["spill_bytes"] == 0, row
        assert row["stack"] == 0, row
        assert 0 < row["registers"] <= 255, row
