"""alectra.seeds: the one seed derivation (SplitMix64) and its named streams."""

import random

import pytest
import torch

from alectra.seeds import Stream, derive_seed, step_seed


def test_step_seed_mixes_every_input():
    seeds = {step_seed(base, step, rank) for base in (0, 1) for step in range(100) for rank in range(4)}
    assert len(seeds) == 800
    assert all(0 <= s < 2**63 for s in seeds)
    assert step_seed(42, 10, 3) == step_seed(42, 10, 3)
    assert derive_seed(5, Stream.MASKING) != derive_seed(5, Stream.SAMPLING)


def test_stream_numbers_and_values_are_pinned():
    """The stream numbers are part of the numerics (every loss of every run depends on them): these values
    are the ones the masking.py/trainer.py literals 0..3 gave before the streams got names."""
    assert [int(s) for s in (Stream.MASKING, Stream.SAMPLING, Stream.DROPOUT, Stream.EVAL)] == [0, 1, 2, 3]
    assert step_seed(1234, 0, 0) == 2980091066764154481  # computed with alectra.masking before the move
    assert [derive_seed(2980091066764154481, s) for s in Stream] == [
        5103909385500165145,
        2903696239725943797,
        2982923305079334692,
        471568258077057066,
    ]


def test_tensor_seed_gives_the_same_values():
    """A seed kept on the device (int64 tensor) derives the same stream seeds as the Python int path."""
    rng = random.Random(0)
    seeds = [rng.getrandbits(63) for _ in range(500)] + [0, 1, 2**62, 2**63 - 1]
    as_tensor = torch.tensor(seeds, dtype=torch.int64)
    for stream in Stream:
        got = derive_seed(as_tensor, stream)
        assert got.dtype == torch.int64 and got.device == as_tensor.device
        assert got.tolist() == [derive_seed(s, stream) for s in seeds], stream
    with pytest.raises(TypeError, match="must be int64"):
        derive_seed(torch.tensor(1, dtype=torch.int32), Stream.MASKING)
