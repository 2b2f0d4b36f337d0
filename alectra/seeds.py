"""Every random number of a run follows from `train.seed` through these functions, and only these.

A micro-batch's seed is `step_seed(train.seed, step, slot)`, where slot = micro * data-parallel size + rank
is the micro-batch's place in the global batch (the data sampler gives that slot the same samples whatever
the split). Each consumer then takes its own independent stream of it with `derive_seed(seed, Stream.X)`:

    Stream.MASKING   0  which positions are masked (alectra.masking)
    Stream.SAMPLING  1  the generator's replacement samples (kernels.sampling)
    Stream.DROPOUT   2  torch's global generator, reseeded before each forward (dropout)
    Stream.EVAL      3  the base seed of held-out evaluation: step_seed(derive_seed(seed, EVAL), batch, rank)

The stream numbers are part of the numerics: changing one changes every loss of every run.

Both functions are chained SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014), so neighbouring inputs give unrelated seeds and runs with different base seeds
never share a stream (unlike base + step * world + rank). Results are 63-bit: they fit int64 and
`torch.Generator.manual_seed`. `derive_seed` also takes an int64 tensor (a seed that lives on the device,
so a new seed per step needs no host-to-device copy) and returns the same value as a tensor there.

`random_bits(seed, counters)` turns a stream seed into random numbers by torch ops on the seed's device: the
outputs of the SplitMix64 generator started at `seed`, one per counter (counter based: any element, in any
order, nothing stored), for the masking of a captured training step (alectra.masking).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


class Stream(enum.IntEnum):
    """The independent random streams of one micro-batch seed (values fixed: see the module docstring)."""

    MASKING = 0
    SAMPLING = 1
    DROPOUT = 2
    EVAL = 3


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a bijective 64-bit mixer with full avalanche."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 value with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's `>>` on int64 is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    """`_splitmix64` on int64 tensors: the same bits (integer add and multiply wrap modulo 2**64)."""
    x = x + _signed(_GOLDEN)
    x = (x ^ _shr(x, 30)) * _signed(_MIX1)
    x = (x ^ _shr(x, 27)) * _signed(_MIX2)
    return x ^ _shr(x, 31)


def random_bits(seed: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """64 random bits (int64) per element of `counters` (int64 tensor >= 0, any shape) from an int64 0-dim
    seed tensor: SplitMix64's output number `counter + 1` from state `seed`, mix(seed + (counter + 1) *
    golden), the same bits `_splitmix64((seed + counter * golden) mod 2**64)` gives on ints. 14 tensor ops.
    """
    return _splitmix64_tensor(counters * _signed(_GOLDEN) + seed)


def step_seed(base_seed: int, step: int, slot: int) -> int:
    """The 63-bit seed of micro-batch `slot` (= micro * data-parallel size + rank) of optimizer `step`."""
    x = _splitmix64(base_seed & _MASK64)
    x = _splitmix64(x ^ (step & _MASK64))
    x = _splitmix64(x ^ (slot & _MASK64))
    return x >> 1


def derive_seed(seed: int | torch.Tensor, stream: Stream) -> int | torch.Tensor:
    """The 63-bit seed of `stream` of `seed`; for an int64 tensor, the same value as a tensor on its device
    (int64 add and multiply wrap modulo 2**64; tests/test_seeds.py checks it on CPU against the int path)."""
    key = _splitmix64(int(stream))
    if isinstance(seed, int):
        return _splitmix64((seed & _MASK64) ^ key) >> 1
    if str(seed.dtype) != "torch.int64":
        raise TypeError(f"derive_seed: a tensor seed must be int64, got {seed.dtype}")
    return _shr(_splitmix64_tensor(seed ^ _signed(key)), 1)
