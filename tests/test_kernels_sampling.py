"""Fused sampling + generator cross-entropy against its PyTorch reference, and sampling statistics.

Runs the Triton kernel under TRITON_INTERPRET=1 where there is no GPU (set by tests/conftest.py).
"""

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.sampling import (
    INVALID_SAMPLE,
    SAMPLING_BLOCK_V,
    philox_uniform,
    philox_uniform4,
    sample_and_cross_entropy,
    sample_and_cross_entropy_reference,
    sample_from_softmax_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (dtype, atol, rtol) for the logits gradient. Both paths compute (softmax - onehot) / M in fp32 from the same
# upcast logits and round once to the logits dtype: at most one ulp of that dtype apart.
GRAD_TOLERANCES = [
    (torch.float32, 1e-8, 1e-5),
    (torch.bfloat16, 1e-8, 2**-7),
    (torch.float16, 1e-8, 2**-10),
]
# The loss is fp32 in both paths; only the order of the logsumexp summation differs.
LOSS_ATOL, LOSS_RTOL = 1e-5, 1e-5
# (M, V): a single row; the masked rows of an odd B x T = 3 x 423 batch (65 = max_predictions at T = 423)
# over an odd small vocabulary; a vocabulary spanning two blocks with a ragged tail. Kept small because the
# interpreter costs ~25 ms per row on this machine.
SHAPES = [(1, 7), (3 * 65, 61), (5, SAMPLING_BLOCK_V + 903)]
# Upper 0.999 quantile of the chi-square distribution, by degrees of freedom (scipy.stats.chi2.ppf).
CHI2_999 = {5: 20.515, 7: 24.322}


def _inputs(rows, vocab, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * scale).to(dtype)  # (M, V)
    targets = torch.randint(0, vocab, (rows,), generator=gen)  # (M,)
    return logits.to(DEVICE), targets.to(DEVICE)


def _seed(value):
    """The seed as the kernels take it: an int64 0-dim tensor on the device."""
    return torch.tensor(value, dtype=torch.int64, device=DEVICE)


def _valid(rows, seed, fraction=0.7):
    """(M,) bool: about `fraction` of the rows real, the first one always."""
    valid = torch.rand(rows, generator=torch.Generator().manual_seed(seed)) < fraction
    valid[0] = True
    return valid.to(DEVICE)


def _run(fn, logits, targets, grad_output=1.0, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss, samples, n_correct = fn(x, targets, **kwargs)
    (loss * grad_output).backward()
    return loss.detach(), samples, n_correct, x.grad


@triton.jit
def _rand_kernel(out_ptr, seed, offset_base, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.rand(seed, offset_base + offs), mask=offs < n)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 + 5, 2**62 + 17])
@pytest.mark.parametrize("offset_base", [0, 2**32 - 100])
def test_philox_reference_is_bit_exact_with_tl_rand(seed, offset_base):
    n = 1000
    out = torch.empty(n, device=DEVICE)
    _rand_kernel[(triton.cdiv(n, 256),)](out, seed, offset_base, n, BLOCK=256)
    ref = philox_uniform(seed, offset_base + torch.arange(n, device=DEVICE))
    assert torch.equal(out, ref)
    assert 0.0 <= float(ref.min()) and float(ref.max()) < 1.0


@triton.jit
def _rand4x_kernel(out_ptr, seed, offset_base, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    u0, u1, u2, u3 = tl.rand4x(seed, offset_base + offs)
    for k, u in enumerate((u0, u1, u2, u3)):
        tl.store(out_ptr + offs * 4 + k, u, mask=offs < n)


@pytest.mark.parametrize("seed", [0, 12345, 2**62 + 17])
@pytest.mark.parametrize("offset_base", [0, 2**32 - 100])
def test_philox_reference_is_bit_exact_with_tl_rand4x(seed, offset_base):
    n = 500
    out = torch.empty(n, 4, device=DEVICE)
    _rand4x_kernel[(triton.cdiv(n, 128),)](out, seed, offset_base, n, BLOCK=128)
    ref = philox_uniform4(seed, offset_base + torch.arange(n, device=DEVICE))
    assert torch.equal(out, ref)
    assert len({tuple(col.tolist()[:5]) for col in ref.T}) == 4  # four different words


@triton.jit
def _rand4x_seed_ptr_kernel(out_ptr, seed_ptr, offset_base, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    u0, u1, u2, u3 = tl.rand4x(tl.load(seed_ptr), offset_base + offs)  # the seed as the kernels read it
    for k, u in enumerate((u0, u1, u2, u3)):
        tl.store(out_ptr + offs * 4 + k, u, mask=offs < n)


@pytest.mark.parametrize("seed", [0, 12345, 2**31 + 5, 2**62 + 17])
def test_seed_tensor_gives_the_int_seeds_philox_stream(seed):
    """A seed read from an int64 device tensor draws exactly the stream of the same value passed as an int."""
    n, offset_base = 300, 2**32 - 100
    from_int = torch.empty(n, 4, device=DEVICE)
    from_tensor = torch.empty(n, 4, device=DEVICE)
    _rand4x_kernel[(triton.cdiv(n, 128),)](from_int, seed, offset_base, n, BLOCK=128)
    _rand4x_seed_ptr_kernel[(triton.cdiv(n, 128),)](from_tensor, _seed(seed), offset_base, n, BLOCK=128)
    offsets = offset_base + torch.arange(n, device=DEVICE)
    assert torch.equal(from_tensor, from_int)
    assert torch.equal(philox_uniform4(_seed(seed), offsets), from_int)


# Samples of the kernel as it was before seeds became tensors (int seed, commit f792d7e), for these inputs.
_SAMPLES_BEFORE_SEED_TENSORS = {
    (7, 1.0): [1910, 103, 1301, 876, 691, 563],
    (7, 0.5): [1910, 199, 1301, 876, 691, 100],
    (2**62 + 17, 1.0): [161, 1261, 733, 120, 450, 275],
    (2**62 + 17, 0.5): [161, 1351, 1855, 120, 450, 1916],
}


@pytest.mark.parametrize(("seed", "temperature"), sorted(_SAMPLES_BEFORE_SEED_TENSORS))
def test_tensor_seed_keeps_the_samples_of_the_int_seed_kernel(seed, temperature):
    gen = torch.Generator().manual_seed(123)
    logits = (torch.randn(6, 2 * 1024 + 5, generator=gen) * 0.5).to(DEVICE)
    targets = torch.randint(0, 2053, (6,), generator=gen).to(DEVICE)
    want = _SAMPLES_BEFORE_SEED_TENSORS[seed, temperature]
    for seed_arg in (_seed(seed), seed):
        samples = sample_and_cross_entropy(logits, targets, seed=seed_arg, temperature=temperature)[1]
        assert samples.tolist() == want


@pytest.mark.parametrize("dtype,atol,rtol", GRAD_TOLERANCES)
@pytest.mark.parametrize("rows,vocab", SHAPES)
def test_matches_reference(rows, vocab, dtype, atol, rtol):
    logits, targets = _inputs(rows, vocab, dtype, seed=rows + vocab)
    loss, samples, n_correct, grad = _run(sample_and_cross_entropy, logits, targets, seed=rows)
    ref = _run(sample_and_cross_entropy_reference, logits, targets, seed=rows)
    ref_loss, ref_samples, ref_n_correct, ref_grad = ref

    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, atol=LOSS_ATOL, rtol=LOSS_RTOL)
    assert samples.dtype == torch.int64 and samples.shape == (rows,)
    # Same Philox stream and the same fp32 arithmetic: identical samples.
    assert torch.equal(samples, ref_samples)
    assert n_correct.dtype == torch.int64 and int(n_correct) == int(ref_n_correct)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=rtol)


# Odd shapes for the valid-row tests: the slots of a 3 x 13 batch over an odd vocabulary, and a vocabulary
# spanning two blocks with a ragged tail (fewer rows than SHAPES: each case runs the kernel twice).
VALID_SHAPES = [(3 * 13, 61), (5, SAMPLING_BLOCK_V + 903)]


@pytest.mark.parametrize("dtype,atol,rtol", GRAD_TOLERANCES)
@pytest.mark.parametrize("rows,vocab", VALID_SHAPES)
def test_valid_rows_match_reference(rows, vocab, dtype, atol, rtol):
    logits, targets = _inputs(rows, vocab, dtype, seed=rows * vocab)
    valid = _valid(rows, seed=rows)
    padded_targets = torch.where(valid, targets, -100)  # a padding slot may hold any id: never read
    kwargs = {"seed": _seed(rows), "valid": valid}
    loss, samples, n_correct, grad = _run(sample_and_cross_entropy, logits, padded_targets, **kwargs)
    ref = _run(sample_and_cross_entropy_reference, logits, padded_targets, **kwargs)
    ref_loss, ref_samples, ref_n_correct, ref_grad = ref

    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, atol=LOSS_ATOL, rtol=LOSS_RTOL)
    assert torch.equal(samples, ref_samples)
    assert int(n_correct) == int(ref_n_correct)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=rtol)
    assert torch.all(samples[~valid] == INVALID_SAMPLE.value)
    assert torch.all(grad[~valid] == 0) and bool(grad[valid].abs().sum() > 0)
    # A row's noise depends on its index only: the valid rows draw what they draw when every row is valid.
    every_row = sample_and_cross_entropy(logits, targets, seed=_seed(rows))[1]
    assert torch.equal(samples[valid], every_row[valid])


@pytest.mark.parametrize("use_triton", [True, False])
def test_valid_rows_loss_is_the_mean_over_valid_rows(use_triton):
    logits, targets = _inputs(40, 50, torch.float32, seed=3)
    valid = _valid(40, seed=4, fraction=0.5)
    targets[::2] = logits[::2].argmax(dim=-1)  # argmax hits on valid and on invalid rows
    x = logits.clone().requires_grad_(True)
    loss, _, n_correct = sample_and_cross_entropy(
        x, targets, seed=_seed(0), valid=valid, use_triton=use_triton
    )
    loss.backward()
    # The definition, with a boolean index (a host sync the op itself never does).
    want = F.cross_entropy(logits[valid], targets[valid])
    want_grad = torch.func.grad(lambda z: F.cross_entropy(z[valid], targets[valid]))(logits)
    torch.testing.assert_close(loss, want, atol=LOSS_ATOL, rtol=LOSS_RTOL)
    torch.testing.assert_close(x.grad, want_grad, atol=1e-8, rtol=1e-5)
    hits = logits.argmax(dim=-1) == targets
    assert int(n_correct) == int((hits & valid).sum()) < int(hits.sum())


@pytest.mark.parametrize("use_triton", [True, False])
def test_no_valid_rows_gives_zero_loss_zero_gradient_and_no_scatter(use_triton):
    rows, vocab, bt = 6, 40, 20
    logits, targets = _inputs(rows, vocab, torch.bfloat16, seed=2)
    valid = torch.zeros(rows, dtype=torch.bool, device=DEVICE)
    disc_ids = torch.full((bt,), 7, dtype=torch.int64, device=DEVICE)
    replaced = torch.full((bt,), 7, dtype=torch.int64, device=DEVICE)
    x = logits.clone().requires_grad_(True)
    loss, samples, n_correct = sample_and_cross_entropy(
        x,
        targets,
        seed=_seed(1),
        valid=valid,
        positions=torch.arange(rows, device=DEVICE) * 3,
        disc_input_ids=disc_ids,
        replaced_labels=replaced,
        use_triton=use_triton,
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(x.grad == 0) and torch.isfinite(x.grad.float()).all()
    assert torch.all(samples == INVALID_SAMPLE.value) and int(n_correct) == 0
    assert torch.all(disc_ids == 7) and torch.all(replaced == 7)


def test_scatter_skips_invalid_rows_whatever_their_positions():
    rows, vocab, bt = 12, 30, 60
    logits, targets = _inputs(rows, vocab, torch.float32, seed=6, scale=1.0)
    valid = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool, device=DEVICE)
    positions = torch.arange(rows, device=DEVICE) * 5 + 1  # distinct on the valid rows
    # Invalid rows point at a valid row's position, before the start and past the end: never read.
    positions[~valid] = torch.tensor([positions[0].item(), -1, bt + 5, positions[5].item()], device=DEVICE)
    input_ids = torch.randint(0, vocab, (bt,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = {}
    for use_triton in (True, False):
        disc_ids = input_ids.clone()
        replaced = torch.full((bt,), True, dtype=torch.bool, device=DEVICE)
        samples = sample_and_cross_entropy(
            logits,
            targets,
            seed=_seed(9),
            valid=valid,
            positions=positions,
            disc_input_ids=disc_ids,
            replaced_labels=replaced,
            use_triton=use_triton,
        )[1]
        results[use_triton] = (disc_ids, replaced, samples)
    written = positions[valid]
    untouched = torch.ones(bt, dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    for disc_ids, replaced, samples in results.values():
        assert torch.equal(disc_ids[written], samples[valid])
        assert torch.equal(replaced[written], samples[valid] != targets[valid])
        assert torch.equal(disc_ids[untouched], input_ids[untouched]) and bool(replaced[untouched].all())
    assert all(torch.equal(a, b) for a, b in zip(results[True], results[False], strict=True))


def test_grad_output_rescale_temperature_and_row_stride():
    # A (M, V) view of a wider buffer: row stride V + 5, column stride 1.
    wide, targets = _inputs(40, 305, torch.float32, seed=11)
    logits = wide[:, :300]
    targets = targets.clamp(max=299)
    loss, samples, n_correct, grad = _run(
        sample_and_cross_entropy, logits, targets, grad_output=2.5, seed=99, temperature=0.7
    )
    ref = _run(sample_and_cross_entropy_reference, logits, targets, grad_output=2.5, seed=99, temperature=0.7)
    torch.testing.assert_close(loss, ref[0], atol=LOSS_ATOL, rtol=LOSS_RTOL)
    assert torch.equal(samples, ref[1]) and int(n_correct) == int(ref[2])
    torch.testing.assert_close(grad, ref[3], atol=1e-8, rtol=1e-5)


def test_argmax_accuracy_counts_exact_hits():
    logits, _ = _inputs(50, 97, torch.float32, seed=5)
    targets = logits.argmax(dim=-1)
    targets[:20] = (targets[:20] + 1) % 97  # 20 wrong, 30 right
    _, _, n_correct = sample_and_cross_entropy(logits, targets, seed=0)
    assert int(n_correct) == 30


@pytest.mark.parametrize("as_tensor", [True, False])
def test_same_seed_same_samples_different_seed_differs(as_tensor):
    logits, targets = _inputs(32, 300, torch.bfloat16, seed=1, scale=0.5)
    seed = _seed if as_tensor else int
    first = sample_and_cross_entropy(logits, targets, seed=seed(42))[1]
    again = sample_and_cross_entropy(logits, targets, seed=seed(42))[1]
    other = sample_and_cross_entropy(logits, targets, seed=seed(43))[1]
    assert torch.equal(first, again)
    # 32 near-uniform draws over 300 ids: seeds agreeing on more than a few rows means the seed is ignored.
    assert int((first == other).sum()) < 5


@pytest.mark.parametrize(
    "use_triton,rows,temperature",
    # The kernel at T = 1 on as many rows as the interpreter affords (smallest expected count 20); the
    # reference, which draws the kernel's samples bit for bit (test_matches_reference), on many more at T = 2.
    [(True, 300, 1.0), (False, 20000, 2.0)],
)
def test_sample_frequencies_match_softmax(use_triton, rows, temperature):
    vocab = 6
    row_logits = torch.tensor([1.0, 0.6, 0.3, 0.0, -0.3, -0.6])
    logits = row_logits.expand(rows, vocab).contiguous().to(DEVICE)  # (M, V) same distribution every row
    targets = torch.zeros(rows, dtype=torch.int64, device=DEVICE)
    _, samples, _ = sample_and_cross_entropy(
        logits, targets, seed=2024, temperature=temperature, use_triton=use_triton
    )
    observed = torch.bincount(samples.cpu(), minlength=vocab).double()
    expected = torch.softmax(row_logits.double() / temperature, dim=0) * rows
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[vocab - 1], (chi2, observed.tolist(), expected.tolist())


def test_scatter_writes_only_masked_positions():
    batch, seq, vocab = 4, 33, 150
    gen = torch.Generator().manual_seed(8)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(DEVICE)  # (B, T)
    positions = torch.randperm(batch * seq, generator=gen)[:25].sort().values.to(DEVICE)  # (M,) flat
    targets = input_ids.view(-1)[positions]  # (M,)
    # Sharp logits peaked at the target for half the rows, so both replaced and kept samples occur.
    logits, _ = _inputs(25, vocab, torch.float32, seed=9, scale=1.0)
    logits[torch.arange(0, 25, 2), targets[::2]] += 20.0

    results = {}
    for use_triton in (True, False):
        disc_ids = input_ids.clone().view(-1)  # (B*T,)
        for label_dtype in (torch.int64, torch.bool):
            replaced = torch.full((batch * seq,), 7, dtype=torch.int64, device=DEVICE).to(label_dtype)
            _, samples, _ = sample_and_cross_entropy(
                logits,
                targets,
                seed=3,
                positions=positions,
                disc_input_ids=disc_ids,
                replaced_labels=replaced,
                use_triton=use_triton,
            )
            results[use_triton, label_dtype] = (disc_ids.clone(), replaced.clone(), samples)

    untouched = torch.ones(batch * seq, dtype=torch.bool, device=DEVICE)
    untouched[positions] = False
    for (_, label_dtype), (disc_ids, replaced, samples) in results.items():
        assert torch.equal(disc_ids[positions], samples)
        assert torch.equal(disc_ids[untouched], input_ids.view(-1)[untouched])
        assert torch.equal(replaced[positions], (samples != targets).to(label_dtype))
        sentinel = torch.tensor(7).to(label_dtype)
        assert torch.all(replaced[untouched] == sentinel)
    kernel, reference = results[True, torch.int64], results[False, torch.int64]
    assert all(torch.equal(a, b) for a, b in zip(kernel, reference, strict=True))
    replaced_rows = kernel[1][positions]
    assert 0 < int(replaced_rows.sum()) < 25  # some kept, some replaced


# numpy, running the interpreter, warns where -max - max overflows to -inf; a GPU does the same silently.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_extreme_logits_give_no_nan(dtype):
    big = torch.finfo(dtype).max
    rows, vocab = 6, 500
    logits = torch.zeros(rows, vocab, dtype=dtype, device=DEVICE)
    logits[:, ::2] = -big
    logits[0, 17] = big  # one dominant id
    logits[1, :] = big  # all ids tie at the top
    logits[2, 3] = big
    logits[2, 4] = -big
    # Targets at finite-loss ids: a target at -max has a true loss of ~2 * max, past fp32's range in bf16.
    targets = torch.tensor([17, 0, 3, 1, 3, 5], device=DEVICE)
    loss, samples, _, grad = _run(sample_and_cross_entropy, logits, targets, seed=5)
    ref_loss = _run(sample_and_cross_entropy_reference, logits, targets, seed=5)[0]
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, atol=LOSS_ATOL, rtol=LOSS_RTOL)
    assert int(samples[0]) == 17 and int(samples[2]) == 3
    assert torch.all((samples >= 0) & (samples < vocab))
    assert torch.all(samples[3:] % 2 == 1)  # never an id at -max


def test_no_masked_positions():
    logits = torch.zeros(0, 10, device=DEVICE, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    loss, samples, n_correct = sample_and_cross_entropy(logits, targets, seed=0)
    loss.backward()
    assert loss.item() == 0.0 and samples.shape == (0,) and int(n_correct) == 0
    assert logits.grad.shape == (0, 10)


def test_initial_loss_is_log_vocab_for_uniform_logits():
    vocab = 1000
    logits = torch.zeros(8, vocab, device=DEVICE)
    loss = sample_and_cross_entropy(logits, torch.arange(8, device=DEVICE), seed=0)[0]
    assert math.isclose(loss.item(), math.log(vocab), rel_tol=1e-6)


def test_bad_input_raises_one_clear_error():
    logits, targets = _inputs(4, 10, torch.float32)
    with pytest.raises(ValueError, match="seed must be an int"):
        sample_and_cross_entropy(logits, targets, seed=-1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_and_cross_entropy(logits, targets, seed=0, temperature=0.0)
    with pytest.raises(ValueError, match="targets must be integer ids"):
        sample_and_cross_entropy(logits, targets[:3], seed=0)
    with pytest.raises(ValueError, match="go together"):
        sample_and_cross_entropy(logits, targets, seed=0, positions=targets)
    with pytest.raises(ValueError, match="2-D float"):
        sample_and_cross_entropy(logits[0], targets, seed=0)
    with pytest.raises(ValueError, match="seed must be an int64 0-dim tensor"):
        sample_and_cross_entropy(logits, targets, seed=torch.tensor([3], device=DEVICE))
    with pytest.raises(ValueError, match="seed must be an int64 0-dim tensor"):
        sample_and_cross_entropy(logits, targets, seed=torch.tensor(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="valid must be a bool tensor of shape"):
        sample_and_cross_entropy(logits, targets, seed=0, valid=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="valid must be a bool tensor of shape"):
        sample_and_cross_entropy(logits, targets, seed=0, valid=torch.ones(3, dtype=torch.bool))


def test_retain_graph_backward_twice_and_int32_targets():
    logits, targets = _inputs(3, 50, torch.float32, seed=4)
    x = logits.clone().requires_grad_(True)
    loss = sample_and_cross_entropy(x, targets.to(torch.int32), seed=1)[0]
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()  # the stored gradient must not have been rescaled in place by the first backward
    torch.testing.assert_close(x.grad, 2 * first, atol=1e-8, rtol=1e-6)
    ref = _run(sample_and_cross_entropy_reference, logits, targets, seed=1)
    torch.testing.assert_close(first, ref[3], atol=1e-8, rtol=1e-5)


def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    from kernels._device import check_triton_device

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="use_triton=False"):
        check_triton_device(torch.zeros(1), "sample_and_cross_entropy")


# The CPU fast sampler (noise="inverse_cdf", what the model runs on CPU): one Philox uniform per row.


def test_inverse_cdf_sampler_is_a_function_of_the_seed_tensor_alone():
    logits, _ = _inputs(200, 50, torch.float32, seed=8, scale=0.3)

    def draw(seed):
        return sample_from_softmax_reference(logits, seed=seed, temperature=1.0, noise="inverse_cdf")

    torch.manual_seed(0)
    rng_state = torch.get_rng_state()
    first = draw(_seed(3))
    assert torch.equal(torch.get_rng_state(), rng_state)  # torch's global RNG neither read nor advanced
    torch.manual_seed(1234)
    assert torch.equal(draw(_seed(3)), first)
    assert torch.equal(draw(3), first)  # the int form is the same stream
    assert torch.equal(
        sample_from_softmax_reference(logits, seed=_seed(3), temperature=1.0, noise="torch"), first
    )  # the model's current name for it
    # 200 near-uniform draws over 50 ids: another seed agreeing on more than a few rows ignores the seed.
    assert int((draw(_seed(4)) == first).sum()) < 20


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_inverse_cdf_sampler_frequencies_match_softmax(temperature):
    rows, vocab = 20000, 6
    row_logits = torch.tensor([1.0, 0.6, 0.3, 0.0, -0.3, -0.6])
    logits = row_logits.expand(rows, vocab).contiguous().to(DEVICE)
    samples = sample_from_softmax_reference(
        logits, seed=_seed(2024), temperature=temperature, noise="inverse_cdf"
    )
    observed = torch.bincount(samples.cpu(), minlength=vocab).double()
    expected = torch.softmax(row_logits.double() / temperature, dim=0) * rows
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[vocab - 1], (chi2, observed.tolist(), expected.tolist())


def test_inverse_cdf_sampler_never_draws_a_zero_probability_token():
    rows = 20000
    row = torch.tensor([float("-inf"), 0.5, float("-inf"), 0.0, -1.0, float("-inf")])  # first, middle, last
    samples = sample_from_softmax_reference(
        row.expand(rows, 6).contiguous().to(DEVICE), seed=_seed(11), temperature=0.5, noise="inverse_cdf"
    )
    counts = torch.bincount(samples.cpu(), minlength=6)
    assert counts[0] == 0 and counts[2] == 0 and counts[5] == 0
    keep = torch.tensor([1, 3, 4])
    expected = torch.softmax(row[keep] / 0.5, -1) * rows
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, chi2  # 2 dof: P(chi2 > 13.8) ~ 1e-3


@pytest.mark.parametrize(("uniform", "want"), [(0.0, 1), (1.0, 3)])
def test_inverse_cdf_extreme_uniforms_land_on_positive_probability_tokens(monkeypatch, uniform, want):
    """u = 0 and u = 1 (past the largest uniform Philox returns) still pick the first / last token of
    positive probability, never a zero-probability neighbour."""
    import kernels.sampling as sampling

    monkeypatch.setattr(sampling, "philox_uniform", lambda seed, offsets: torch.full(offsets.shape, uniform))
    row = torch.tensor([float("-inf"), 0.5, float("-inf"), 0.0, float("-inf")])
    samples = sampling.sample_from_softmax_reference(
        row.expand(4, 5).contiguous(), seed=_seed(0), temperature=1.0, noise="inverse_cdf"
    )
    assert samples.tolist() == [want] * 4


@pytest.mark.parametrize("noise", ["inverse_cdf", "philox"])
def test_reference_samples_stay_valid_ids_for_non_finite_logits(noise):
    """A diverged step (NaN / inf logits) still samples ids an embedding can look up."""
    logits = torch.randn(4, 9, device=DEVICE)
    logits[0] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    samples = sample_from_softmax_reference(logits, seed=_seed(0), temperature=1.0, noise=noise)
    assert torch.all((samples >= 0) & (samples < 9)), samples
