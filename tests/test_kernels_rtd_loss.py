"""The fused RTD loss kernel against its PyTorch reference (TRITON_INTERPRET=1 where there is no GPU)."""

import pytest
import torch

from kernels.rtd_loss import RTD_BLOCK, rtd_loss, rtd_loss_forward, rtd_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (dtype, atol, rtol) for the gradient. Both paths compute in fp32 from the same upcast logits and round the
# final gradient once to the logits dtype, so they differ by at most one ulp of that dtype.
GRAD_TOLERANCES = [
    (torch.float32, 1e-7, 1e-5),
    (torch.bfloat16, 1e-7, 2**-7),
    (torch.float16, 1e-7, 2**-10),
]
# The loss is fp32 in both paths; only the summation order and log(1 + e) vs log1p differ.
LOSS_ATOL, LOSS_RTOL = 1e-6, 1e-5
# 1 element, one full block, an odd B x T = 3 x 423, and several blocks with a ragged tail.
SHAPES = [1, RTD_BLOCK, 3 * 423, 2 * RTD_BLOCK + 77]


def _inputs(n, dtype, label_dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, generator=gen) * 4).to(dtype)  # (N,) a spread wide enough for both signs
    labels = (torch.rand(n, generator=gen) < 0.3).to(label_dtype)  # (N,)
    mask = torch.rand(n, generator=gen) < 0.8  # (N,)
    mask[0] = True  # at least one real token
    return logits.to(DEVICE), labels.to(DEVICE), mask.to(DEVICE)


def _loss_counts_grad(fn, logits, labels, mask, grad_output=1.0):
    x = logits.detach().clone().requires_grad_(True)
    loss, counts = fn(x, labels, mask)
    (loss * grad_output).backward()
    return loss.detach(), counts, x.grad


@pytest.mark.parametrize("dtype,atol,rtol", GRAD_TOLERANCES)
@pytest.mark.parametrize("n", SHAPES)
def test_matches_reference(n, dtype, atol, rtol):
    logits, labels, mask = _inputs(n, dtype, seed=n)
    loss, counts, grad = _loss_counts_grad(rtd_loss, logits, labels, mask)
    ref_loss, ref_counts, ref_grad = _loss_counts_grad(rtd_loss_reference, logits, labels, mask)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, atol=LOSS_ATOL, rtol=LOSS_RTOL)
    assert counts.dtype == torch.int64 and counts.shape == (4,)
    assert torch.equal(counts, ref_counts)
    assert int(counts.sum()) == int(mask.sum())
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=rtol)
    assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("label_dtype", [torch.bool, torch.float32, torch.int32])
def test_label_dtypes_and_grad_output_rescale(label_dtype):
    logits, labels, mask = _inputs(777, torch.float32, label_dtype=label_dtype, seed=3)
    loss, counts, grad = _loss_counts_grad(rtd_loss, logits, labels, mask, grad_output=50.0)
    ref_loss, ref_counts, ref_grad = _loss_counts_grad(rtd_loss_reference, logits, labels, mask, 50.0)
    torch.testing.assert_close(loss, ref_loss, atol=LOSS_ATOL, rtol=LOSS_RTOL)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=1e-5)


def test_counts_follow_the_definition():
    # Hand-made case: predictions logit > 0, labels 1 = replaced; the last token is padding.
    logits = torch.tensor([3.0, 2.0, -1.0, -4.0, 0.0, 5.0], device=DEVICE)
    labels = torch.tensor([1, 0, 1, 0, 1, 1], device=DEVICE)
    mask = torch.tensor([True, True, True, True, True, False], device=DEVICE)
    _, counts = rtd_loss(logits, labels, mask)
    # tp: idx 0; fp: idx 1; fn: idx 2 and 4 (logit 0 is not > 0); tn: idx 3.
    assert counts.tolist() == [1, 1, 2, 1]


def test_extreme_logits_stay_finite():
    logits = torch.tensor([65504.0, -65504.0, 80.0, -80.0, 0.0], dtype=torch.float16, device=DEVICE)
    labels = torch.tensor([0, 1, 1, 0, 1], device=DEVICE)
    mask = torch.ones(5, dtype=torch.bool, device=DEVICE)
    loss, _, grad = _loss_counts_grad(rtd_loss, logits, labels, mask)
    ref_loss, _, ref_grad = _loss_counts_grad(rtd_loss_reference, logits, labels, mask)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=2**-10)


def test_deterministic_and_empty_mask():
    logits, labels, mask = _inputs(3000, torch.float32, seed=7)
    first = rtd_loss(logits, labels, mask)[0]
    assert torch.equal(first, rtd_loss(logits, labels, mask)[0])  # bit for bit: no float atomics
    x = logits.clone().requires_grad_(True)
    loss, counts = rtd_loss(x, labels, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0 and counts.tolist() == [0, 0, 0, 0] and torch.all(x.grad == 0)


def test_bad_input_raises_one_clear_error():
    logits, labels, mask = _inputs(10, torch.float32)
    with pytest.raises(ValueError, match="same length"):
        rtd_loss(logits, labels[:5], mask)
    with pytest.raises(ValueError, match="mask must be a bool"):
        rtd_loss(logits, labels, mask.long())
    with pytest.raises(ValueError, match="1-D"):
        rtd_loss(logits.view(2, 5), labels.view(2, 5), mask.view(2, 5))


def test_retain_graph_backward_twice():
    logits, labels, mask = _inputs(100, torch.float32, seed=2)
    x = logits.clone().requires_grad_(True)
    loss = rtd_loss(x, labels, mask)[0]
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("programs_per_sm,block", [(1, 128), (3, 256), (2, 1024)])
def test_grid_stride_launch_matches_reference(programs_per_sm, block):
    """Programs that loop over several tiles (the GPU's persistent launch) give the reference's results."""
    logits, labels, mask = _inputs(5 * 423 + 11, torch.float32, seed=7)
    ref_loss, ref_counts = rtd_loss_reference(logits, labels, mask)
    ref_grad = torch.func.grad(lambda x: rtd_loss_reference(x, labels, mask)[0])(logits)
    loss, counts, grad = rtd_loss_forward(logits, labels, mask, block=block, programs_per_sm=programs_per_sm)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(loss, ref_loss, atol=LOSS_ATOL, rtol=LOSS_RTOL)
    n = int(mask.sum())
    torch.testing.assert_close(grad / n, ref_grad, atol=1e-7, rtol=1e-5)
