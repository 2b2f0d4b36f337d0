"""Compile every kernel specialisation for real NVIDIA GPUs without one, and report registers and spills.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole pipeline (TTIR -> TTGIR ->
LLVM -> PTX -> ptxas cubin) on a machine with no GPU; `cuobjdump -res-usage`, shipped in Triton's wheel under
triton/backends/nvidia/bin, reads registers, stack, shared memory and LOCAL (spill) bytes from the cubin.

TRITON_INTERPRET=1 must not be set: under it `@triton.jit` returns an interpreted function that cannot be
compiled. `python -m kernels.compile_check` therefore removes it from its own environment before importing the
kernels; tests run it as a subprocess for the same reason.

    python -m kernels.compile_check            # table for sm_80 and sm_90
    python -m kernels.compile_check --json     # one JSON object per specialisation
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

# @triton.jit picks interpreter or compiler when a kernel is defined (triton's own tl.rand included), so the
# variable has to go before triton is imported at all.
if os.environ.pop("TRITON_INTERPRET", None) is not None and "triton" in sys.modules:
    raise RuntimeError(
        "kernels.compile_check: triton was already imported with TRITON_INTERPRET set; run "
        "`env -u TRITON_INTERPRET python -m kernels.compile_check` in a fresh process"
    )

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.rtd_loss import (  # noqa: E402
    RTD_BLOCK,
    RTD_BWD_BLOCK,
    RTD_FINISH_BLOCK,
    RTD_NUM_WARPS,
    _rtd_loss_bwd_kernel,
    _rtd_loss_finish_kernel,
    _rtd_loss_fwd_kernel,
)
from kernels.sampling import (  # noqa: E402
    SAMPLING_BLOCK_V,
    SAMPLING_FINISH_BLOCK,
    SAMPLING_NUM_WARPS,
    _sample_ce_finish_kernel,
    _sample_ce_fwd_kernel,
)

CAPABILITIES = (80, 90)
LOGIT_DTYPES = ("fp32", "bf16", "fp16")


@dataclasses.dataclass(kw_only=True)
class Specialisation:
    """One compiled variant of a kernel."""

    name: str
    """Human-readable label, e.g. `sample_ce[bf16,scatter]`."""
    fn: object
    """The @triton.jit function."""
    signature: dict
    """Argument name -> Triton type string (`*bf16`, `i64`, `constexpr`, ...)."""
    constexprs: dict
    """Values of the constexpr arguments."""
    num_warps: int
    """Warps per program, as launched."""

    def __post_init__(self):
        missing = [k for k, v in self.signature.items() if v == "constexpr" and k not in self.constexprs]
        if missing:
            raise ValueError(f"{self.name}: constexpr arguments without a value: {missing}")


def specialisations() -> list[Specialisation]:
    """The variants the launch functions use: every logits dtype, with and without valid rows and scatter."""
    out = []
    for dtype in LOGIT_DTYPES:
        # (HAS_VALID, SCATTER): the model's two call forms in every dtype, no scatter in bf16 only.
        variants = ((True, True), (False, True)) + (((False, False),) if dtype == "bf16" else ())
        for has_valid, scatter in variants:
            out.append(
                Specialisation(
                    name=f"sample_ce[{dtype}{',valid' if has_valid else ''}{',scatter' if scatter else ''}]",
                    fn=_sample_ce_fwd_kernel,
                    signature={
                        "logits_ptr": f"*{dtype}",
                        "logits_row_stride": "i64",
                        "grad_ptr": f"*{dtype}",
                        "grad_row_stride": "i64",
                        "targets_ptr": "*i64",
                        "seed_ptr": "*i64",
                        # Without valid rows the launcher passes the fp32 loss buffer, never read.
                        "valid_ptr": "*u8" if has_valid else "*fp32",
                        "n_valid_ptr": "*i64" if has_valid else "*fp32",
                        "loss_ptr": "*fp32",
                        "samples_ptr": "*i64",
                        "correct_ptr": "*i32",
                        "positions_ptr": "*i64",
                        "disc_ids_ptr": "*i64",
                        "replaced_ptr": "*i64",
                        "n_rows": "i32",
                        "vocab_size": "i32",
                        "inv_temperature": "fp32",
                        "HAS_VALID": "constexpr",
                        "SCATTER": "constexpr",
                        "BLOCK_V": "constexpr",
                    },
                    constexprs={"HAS_VALID": has_valid, "SCATTER": scatter, "BLOCK_V": SAMPLING_BLOCK_V},
                    num_warps=SAMPLING_NUM_WARPS,
                )
            )
        out.append(
            Specialisation(
                name=f"rtd_loss[{dtype}]",
                fn=_rtd_loss_fwd_kernel,
                signature={
                    "logits_ptr": f"*{dtype}",
                    "labels_ptr": "*i64",
                    "mask_ptr": "*u8",
                    "grad_ptr": "*fp32",
                    "loss_partial_ptr": "*fp32",
                    "counts_partial_ptr": "*i64",
                    "n_elements": "i32",
                    "tiles_per_program": "i32",
                    "BLOCK": "constexpr",
                },
                constexprs={"BLOCK": RTD_BLOCK},
                num_warps=RTD_NUM_WARPS,
            )
        )
        out.append(
            Specialisation(
                name=f"rtd_loss_bwd[{dtype}]",
                fn=_rtd_loss_bwd_kernel,
                signature={
                    "grad_ptr": "*fp32",
                    "counts_ptr": "*i64",
                    "grad_output_ptr": "*fp32",
                    "out_ptr": f"*{dtype}",
                    "n_elements": "i32",
                    "BLOCK": "constexpr",
                },
                constexprs={"BLOCK": RTD_BWD_BLOCK},
                num_warps=RTD_NUM_WARPS,
            )
        )
    for has_valid in (True, False):
        out.append(
            Specialisation(
                name=f"sample_ce_finish{'[valid]' if has_valid else ''}",
                fn=_sample_ce_finish_kernel,
                signature={
                    "row_loss_ptr": "*fp32",
                    "correct_ptr": "*i32",
                    "n_valid_ptr": "*i64" if has_valid else "*fp32",
                    "loss_ptr": "*fp32",
                    "n_correct_ptr": "*i64",
                    "n_rows": "i32",
                    "HAS_VALID": "constexpr",
                    "BLOCK": "constexpr",
                },
                constexprs={"HAS_VALID": has_valid, "BLOCK": SAMPLING_FINISH_BLOCK},
                num_warps=4,
            )
        )
    out.append(
        Specialisation(
            name="rtd_loss_finish",
            fn=_rtd_loss_finish_kernel,
            signature={
                "loss_partial_ptr": "*fp32",
                "counts_partial_ptr": "*i64",
                "num_blocks": "i32",
                "loss_ptr": "*fp32",
                "counts_ptr": "*i64",
                "BLOCK": "constexpr",
            },
            constexprs={"BLOCK": RTD_FINISH_BLOCK},
            num_warps=4,
        )
    )
    return out


def cuobjdump_path() -> str:
    """The cuobjdump binary shipped in Triton's wheel."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path}; reinstall triton (the wheel ships it)")
    return path


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Parse `cuobjdump -res-usage`: REG, STACK, SHARED, LOCAL (bytes of spill / local memory)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run(
            [cuobjdump_path(), "-res-usage", handle.name], capture_output=True, text=True, check=True
        ).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def compile_one(spec: Specialisation, capability: int) -> dict:
    """Compile one specialisation for sm_<capability>; returns its resource usage."""
    kernel = triton.compile(
        ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": spec.num_warps},
    )
    usage = resource_usage(kernel.asm["cubin"])
    return {
        "kernel": spec.name,
        "sm": capability,
        "num_warps": spec.num_warps,
        "registers": usage["REG"],
        "spill_bytes": usage["LOCAL"],
        "stack": usage["STACK"],
        "static_shared": usage["SHARED"],
        "triton_shared": kernel.metadata.shared,
    }


def _compile_job(job: tuple[int, int]) -> dict:
    # By index: JITFunction objects do not pickle across processes.
    index, capability = job
    return compile_one(specialisations()[index], capability)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    args = parser.parse_args(argv)
    jobs = [(index, cc) for cc in CAPABILITIES for index in range(len(specialisations()))]
    # ptxas and the MLIR passes are CPU-bound and independent per job: two workers halve the wall time.
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(_compile_job, jobs))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(
        "| kernel | sm | warps | registers/thread | spills (LOCAL bytes) | stack | static shared "
        "| dynamic shared |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['kernel']} | {row['sm']} | {row['num_warps']} | {row['registers']} | "
            f"{row['spill_bytes']} | {row['stack']} | {row['static_shared']} | {row['triton_shared']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
