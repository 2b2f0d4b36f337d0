"""Fused sigmoid replaced-token-detection (RTD) loss with its gradient and metric counts.

ELECTRA's discriminator loss (google-research/electra `run_pretraining.py`, `_get_discriminator_output`) is
the masked mean of `tf.nn.sigmoid_cross_entropy_with_logits` over real (non-padding) tokens. One pass over the
logits here computes, per element,

    loss_i = max(x, 0) - x * y + log(1 + exp(-|x|))      (the numerically stable form TF documents)
    grad_i = sigmoid(x) - y                               (d loss_i / d x)

and counts tp / fp / fn / tn of the prediction `x > 0` so the discriminator metrics cost nothing extra.

The mean needs the number of masked-in elements `n`, which is only known once the pass is over. Instead of an
extra pass (or float atomics, which are not deterministic) the kernel stores the *unscaled* gradient and the
per-program partial sums; `n = tp + fp + fn + tn` comes from the same pass, and backward rescales the stored
gradient by `grad_output / n` (the Liger-Kernel cross-entropy idea: backward is a rescale). A one-program
kernel reduces the partial sums in a fixed order (so the loss is bit-for-bit deterministic for a given shape
on a given GPU: the program count follows its SM count) and writes the loss and the counts; the backward
kernel reads `grad_output` and `n` from device memory and writes the logits-dtype gradient in one pass. Three
launches in all, no host synchronisation. The forward and backward launch functions are torch custom ops
(`alectra::rtd_loss`, `alectra::rtd_loss_backward`), single nodes in a torch.compile graph.

Legend for shape comments: N = number of tokens (B * T flattened).
"""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._device import check_triton_device

# Elements per tile, warps, programs per SM (each program loops over tiles, grid-stride, and reduces once
# at the end; 0 = one program per tile). 512 x 4 warps x 16 programs per SM was the fastest configuration
# swept on an H100 (benchmarks/RESULTS.md, bench_kernels.py --sweep): 93 % of copy bandwidth for bf16 logits,
# against 71 % with one program per tile, which pays its block reductions for every 1024 tokens.
RTD_BLOCK = 512
RTD_NUM_WARPS = 4
RTD_PROGRAMS_PER_SM = 16
# The backward rescale is a plain elementwise pass: one program per 1024 tokens (as measured in the sweep).
RTD_BWD_BLOCK = 1024
# The finishing kernel reduces this many program partials per iteration, in one program.
RTD_FINISH_BLOCK = 1024
# A program's per-lane counts are 16-bit fields, filled by at most one token per tile (see the kernel).
MAX_TILES_PER_PROGRAM = (1 << 15) - 1


@triton.jit
def _rtd_loss_fwd_kernel(
    logits_ptr,
    labels_ptr,
    mask_ptr,
    grad_ptr,
    loss_partial_ptr,
    counts_partial_ptr,
    n_elements,
    tiles_per_program,
    BLOCK: tl.constexpr,
):
    """Tiles pid, pid + P, pid + 2P, ... (P programs): loss partial sum, unscaled gradient, confusion counts.

    logits_ptr: (N,) any float dtype, contiguous.  labels_ptr: (N,) {0, 1}, any numeric dtype.
    mask_ptr: (N,) uint8 (a bool tensor viewed as uint8); 0 = padding, ignored.
    grad_ptr: (N,) fp32; receives (sigmoid(x) - y) * mask, *not* divided by the mask count.
    loss_partial_ptr: (P,) fp32; receives this program's sum of masked losses.
    counts_partial_ptr: (P, 4) int64 row-major; receives this program's [tp, fp, fn, tn].
    n_elements: N.  tiles_per_program: ceil(ceil(N / BLOCK) / P).  BLOCK: tokens per tile (power of two).
    """
    pid = tl.program_id(0).to(tl.int64)
    num_programs = tl.num_programs(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    # Per-lane accumulators, reduced once at the end: a tile costs no block-wide reduction. Counts are packed
    # 16 bits per field into two int32 lanes (tp | fp << 16 for predicted-replaced, fn | tn << 16 otherwise);
    # a lane counts at most tiles_per_program <= MAX_TILES_PER_PROGRAM < 2^15 tokens per field.
    loss_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    positive = tl.zeros((BLOCK,), dtype=tl.int32)
    negative = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(0, tiles_per_program):
        offs = (pid + i * num_programs) * BLOCK + cols  # (BLOCK,) int64
        in_bounds = offs < n_elements
        x = tl.load(logits_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        y = tl.load(labels_ptr + offs, mask=in_bounds, other=0).to(tl.float32)
        keep = (tl.load(mask_ptr + offs, mask=in_bounds, other=0) != 0) & in_bounds

        # e = exp(-|x|) <= 1 never overflows. log(1 + e): when e < 2^-24 the rounding of 1 + e costs at most
        # 6e-8 absolute, below the loss' own fp32 resolution. sigmoid(x) from the same e: 1 / (1 + e) for
        # x >= 0, e / (1 + e) for x < 0 (no exp(+|x|) = inf on the way, unlike 1 / (1 + exp(-x))).
        e = tl.exp(-tl.abs(x))
        loss = tl.maximum(x, 0.0) - x * y + tl.log(1.0 + e)
        loss_acc += tl.where(keep, loss, 0.0)
        sigmoid = tl.where(x >= 0.0, 1.0, e) / (1.0 + e)
        tl.store(grad_ptr + offs, tl.where(keep, sigmoid - y, 0.0), mask=in_bounds)

        predicted = x > 0.0
        unit = tl.where(y > 0.5, 1, 1 << 16)  # low field: replaced; high field: original
        positive += tl.where(keep & predicted, unit, 0)
        negative += tl.where(keep & ~predicted, unit, 0)
    tl.store(loss_partial_ptr + pid, tl.sum(loss_acc, axis=0))
    # Widen each lane to 32-bit fields in an int64 (a program counts < 2^31 tokens), then one reduction each.
    positive = positive.to(tl.int64)
    negative = negative.to(tl.int64)
    pos_sum = tl.sum((positive & 0xFFFF) | ((positive >> 16) << 32), axis=0)
    neg_sum = tl.sum((negative & 0xFFFF) | ((negative >> 16) << 32), axis=0)
    counts_row = counts_partial_ptr + pid * 4
    tl.store(counts_row + 0, pos_sum & 0xFFFFFFFF)  # tp
    tl.store(counts_row + 1, pos_sum >> 32)  # fp
    tl.store(counts_row + 2, neg_sum & 0xFFFFFFFF)  # fn
    tl.store(counts_row + 3, neg_sum >> 32)  # tn


@triton.jit
def _rtd_loss_finish_kernel(
    loss_partial_ptr, counts_partial_ptr, num_blocks, loss_ptr, counts_ptr, BLOCK: tl.constexpr
):
    """One program: the fixed-order sums of the block partials, the mean loss and the int64 counts.

    loss_partial_ptr: (num_blocks,) fp32.  counts_partial_ptr: (num_blocks, 4) int64 row-major.
    loss_ptr: (1,) fp32; receives sum(loss) / max(n, 1).  counts_ptr: (4,) int64; receives [tp, fp, fn, tn].
    """
    offs = tl.arange(0, BLOCK)
    loss_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    tp = tl.zeros((BLOCK,), dtype=tl.int64)
    fp = tl.zeros((BLOCK,), dtype=tl.int64)
    fn = tl.zeros((BLOCK,), dtype=tl.int64)
    tn = tl.zeros((BLOCK,), dtype=tl.int64)
    for start in range(0, num_blocks, BLOCK):
        block = start + offs
        valid = block < num_blocks
        loss_acc += tl.load(loss_partial_ptr + block, mask=valid, other=0.0)
        row = counts_partial_ptr + block.to(tl.int64) * 4
        tp += tl.load(row + 0, mask=valid, other=0)
        fp += tl.load(row + 1, mask=valid, other=0)
        fn += tl.load(row + 2, mask=valid, other=0)
        tn += tl.load(row + 3, mask=valid, other=0)
    n_tp = tl.sum(tp, axis=0)
    n_fp = tl.sum(fp, axis=0)
    n_fn = tl.sum(fn, axis=0)
    n_tn = tl.sum(tn, axis=0)
    n = tl.maximum(n_tp + n_fp + n_fn + n_tn, 1)
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / n.to(tl.float32))
    tl.store(counts_ptr + 0, n_tp)
    tl.store(counts_ptr + 1, n_fp)
    tl.store(counts_ptr + 2, n_fn)
    tl.store(counts_ptr + 3, n_tn)


@triton.jit
def _rtd_loss_bwd_kernel(grad_ptr, counts_ptr, grad_output_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    """out = grad * grad_output / max(n, 1), rounded once to out's dtype.

    grad_ptr: (N,) fp32 unscaled gradient from the forward.  counts_ptr: (4,) int64 [tp, fp, fn, tn] (n is
    their sum).  grad_output_ptr: (1,) d outer loss / d rtd loss, any float dtype.
    out_ptr: (N,) logits dtype.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n_elements
    n = tl.load(counts_ptr + 0) + tl.load(counts_ptr + 1) + tl.load(counts_ptr + 2) + tl.load(counts_ptr + 3)
    scale = tl.load(grad_output_ptr).to(tl.float32) / tl.maximum(n, 1).to(tl.float32)
    grad = tl.load(grad_ptr + offs, mask=in_bounds, other=0.0)
    tl.store(out_ptr + offs, (grad * scale).to(out_ptr.dtype.element_ty), mask=in_bounds)


# The launch functions are torch custom ops, so torch.compile keeps each as one opaque node of the graph
# (it traces the fake implementations below, never a Triton launch) and CUDA graphs capture them. custom_op
# rather than triton_op: triton_op lets the compiler trace into the launches, which it cannot do for kernels
# run by the Triton interpreter (TRITON_INTERPRET=1). The forward is functional, so its backward is
# registered on the op itself (`register_autograd`, torch/_library/custom_ops.py) and calls the backward op.
@torch.library.custom_op("alectra::rtd_loss", mutates_args=())
def rtd_loss_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    block: int = RTD_BLOCK,
    num_warps: int = RTD_NUM_WARPS,
    programs_per_sm: int = RTD_PROGRAMS_PER_SM,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused kernel and its reduction. Returns (loss fp32 scalar, counts int64 (4,), unscaled fp32
    gradient (N,)). `block` / `num_warps` / `programs_per_sm`: launch configuration (benchmarks sweep them).
    """
    logits = logits.contiguous()
    labels = labels.contiguous()
    mask = mask.contiguous()
    if labels.dtype == torch.bool:
        labels = labels.view(torch.uint8)
    n_elements = logits.numel()
    num_tiles = max(1, triton.cdiv(n_elements, block))
    device = logits.device
    programs = num_tiles
    if programs_per_sm > 0:  # grid-stride; a CPU (the interpreter) counts as one SM
        programs = min(num_tiles, programs_per_sm * (_sm_count(device) if device.type == "cuda" else 1))
    programs = max(programs, triton.cdiv(num_tiles, MAX_TILES_PER_PROGRAM))
    # fp32 even for bf16/fp16 logits: backward then rounds once, after the rescale (4 bytes per token, tiny
    # next to the discriminator's activations).
    grad = torch.empty(n_elements, dtype=torch.float32, device=device)  # (N,)
    loss_partial = torch.empty(programs, dtype=torch.float32, device=device)
    counts_partial = torch.empty(programs, 4, dtype=torch.int64, device=device)  # [tp, fp, fn, tn] rows
    _rtd_loss_fwd_kernel[(programs,)](
        logits,
        labels,
        mask.view(torch.uint8),
        grad,
        loss_partial,
        counts_partial,
        n_elements,
        triton.cdiv(num_tiles, programs),
        BLOCK=block,
        num_warps=num_warps,
    )
    loss = torch.empty((), dtype=torch.float32, device=device)
    counts = torch.empty(4, dtype=torch.int64, device=device)  # [tp, fp, fn, tn]
    _rtd_loss_finish_kernel[(1,)](
        loss_partial, counts_partial, programs, loss, counts, BLOCK=RTD_FINISH_BLOCK, num_warps=4
    )
    return loss, counts, grad


@rtd_loss_forward.register_fake
def _(logits, labels, mask, **kwargs):
    """What torch.compile traces: the outputs' shapes and dtypes."""
    return (
        logits.new_empty((), dtype=torch.float32),
        logits.new_empty(4, dtype=torch.int64),
        logits.new_empty(logits.numel(), dtype=torch.float32),
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@torch.library.custom_op("alectra::rtd_loss_backward", mutates_args=())
def rtd_loss_backward(
    grad: torch.Tensor,
    counts: torch.Tensor,
    grad_output: torch.Tensor,
    dtype: torch.dtype,
    *,
    block: int = RTD_BWD_BLOCK,
    num_warps: int = RTD_NUM_WARPS,
) -> torch.Tensor:
    """d loss / d logits = stored (sigmoid(x) - y) * mask, rescaled by grad_output / n (n = mask count)."""
    # Out of place, so a second backward (retain_graph=True) still sees the unscaled gradient.
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    n_elements = grad.numel()
    _rtd_loss_bwd_kernel[(max(1, triton.cdiv(n_elements, block)),)](
        grad, counts, grad_output.reshape(1), out, n_elements, BLOCK=block, num_warps=num_warps
    )
    return out


@rtd_loss_backward.register_fake
def _(grad, counts, grad_output, dtype, **kwargs):
    return grad.new_empty(grad.shape, dtype=dtype)


def _rtd_loss_setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    logits, _, _ = inputs
    _, counts, grad = output
    ctx.save_for_backward(grad, counts)
    ctx.mark_non_differentiable(counts, grad)
    ctx.set_materialize_grads(False)  # no zero tensors for the gradients of counts and grad
    ctx.logits_dtype = logits.dtype


def _rtd_loss_backward_formula(ctx, grad_loss, grad_counts, grad_grad):
    """Backward is a rescale of the stored gradient by grad_output / n (one launch)."""
    if grad_loss is None:
        return None, None, None
    grad, counts = ctx.saved_tensors
    return rtd_loss_backward(grad, counts, grad_loss, ctx.logits_dtype), None, None


rtd_loss_forward.register_autograd(_rtd_loss_backward_formula, setup_context=_rtd_loss_setup_context)


def rtd_loss_reference(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The math in PyTorch: masked-mean sigmoid BCE (fp32, differentiable) and [tp, fp, fn, tn] (int64)."""
    _check_inputs(logits, labels, mask)
    keep = mask.bool()
    per_token = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")  # (N,)
    n = keep.sum().clamp(min=1)
    loss = (per_token * keep).sum() / n
    predicted = logits.detach() > 0
    replaced = labels != 0
    counts = torch.stack(
        [
            (keep & predicted & replaced).sum(),
            (keep & predicted & ~replaced).sum(),
            (keep & ~predicted & replaced).sum(),
            (keep & ~predicted & ~replaced).sum(),
        ]
    ).to(torch.int64)
    return loss, counts


def rtd_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *, use_triton: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-mean sigmoid RTD loss and confusion counts.

    logits (N,) any float dtype; labels (N,) {0, 1} (1 = replaced); mask (N,) bool (True = real token).
    Returns loss (fp32 scalar, differentiable w.r.t. logits) and counts int64 (4,) = [tp, fp, fn, tn] over
    the mask, with prediction `logit > 0`. `use_triton=False` runs `rtd_loss_reference`.
    """
    if not use_triton:
        return rtd_loss_reference(logits, labels, mask)
    _check_inputs(logits, labels, mask)
    check_triton_device(logits, "rtd_loss")
    loss, counts, _ = rtd_loss_forward(logits, labels, mask)
    return loss, counts


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
    if logits.dim() != 1 or labels.shape != logits.shape or mask.shape != logits.shape:
        raise ValueError(
            f"rtd_loss: logits, labels and mask must all be 1-D of the same length, got "
            f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(mask.shape)}; flatten (B, T) with "
            ".view(-1)"
        )
    if not logits.is_floating_point():
        raise ValueError(f"rtd_loss: logits must be a float tensor, got {logits.dtype}")
    if mask.dtype != torch.bool:
        raise ValueError(f"rtd_loss: mask must be a bool tensor, got {mask.dtype}; use attention_mask.bool()")
