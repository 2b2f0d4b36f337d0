"""Both kernel families inside torch.compile: registered custom ops, no graph breaks, compiled == eager, a new
seed is not a recompile, and a call neither synchronises with the host nor dispatches more than its op.

One small step calls both ops the way the model chains them: the sampler scatters into `replaced`, which the
RTD loss then reads, so functionalisation of the mutated buffers is exercised too. Three paths: the Triton
kernels (interpreter on CPU, tests/conftest.py), the bit-exact reference ("philox") and the CPU fast sampler
("inverse_cdf"); the two reference paths use the RTD reference.
"""

import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.rtd_loss import rtd_loss, rtd_loss_backward, rtd_loss_forward
from kernels.sampling import (
    sample_and_cross_entropy,
    sample_and_cross_entropy_forward,
    sample_and_cross_entropy_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = ["triton", "philox", "inverse_cdf"]
# M slots over an odd vocabulary; B * T = 5 x 7 tokens.
ROWS, VOCAB, TOKENS = 6, 37, 35
# Ops that make the host wait for the device (a value read back, a data-dependent shape).
SYNCING_OPS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::nonzero",
    "aten::masked_select",
    "aten::equal",
}


@functools.cache
def _fixed_inputs():
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, VOCAB, (ROWS,), generator=gen)  # (M,)
    valid = torch.tensor([True, True, False, True, False, True])  # (M,)
    positions = torch.randperm(TOKENS, generator=gen)[:ROWS]  # (M,) distinct
    mask = torch.rand(TOKENS, generator=gen) < 0.8  # (BT,)
    gen_logits = torch.randn(ROWS, VOCAB, generator=gen) * 2  # (M, V)
    disc_logits = torch.randn(TOKENS, generator=gen) * 2  # (BT,)
    input_ids = torch.randint(0, VOCAB, (TOKENS,), generator=gen)  # (BT,)
    tensors = (targets, valid, positions, mask, gen_logits, disc_logits, input_ids)
    return tuple(t.to(DEVICE) for t in tensors)


def _step_fn(path):
    """One generator + discriminator loss step through the path's implementations."""
    targets, valid, positions, mask, *_ = _fixed_inputs()
    if path == "triton":
        sampler = functools.partial(sample_and_cross_entropy, use_triton=True)
    else:
        sampler = functools.partial(sample_and_cross_entropy_reference, noise=path)

    def step(gen_logits, seed, disc_input_ids, replaced, disc_logits):
        gen_loss, samples, n_correct = sampler(
            gen_logits,
            targets,
            seed=seed,
            valid=valid,
            positions=positions,
            disc_input_ids=disc_input_ids,
            replaced_labels=replaced,
        )
        disc_loss, counts = rtd_loss(disc_logits, replaced, mask, use_triton=path == "triton")
        return gen_loss + 50.0 * disc_loss, samples, n_correct, counts

    return step


def _step_args(seed):
    """Fresh leaves and buffers for one call: (gen_logits, seed, disc_input_ids, replaced, disc_logits)."""
    *_, gen_logits, disc_logits, input_ids = _fixed_inputs()
    return (
        gen_logits.clone().requires_grad_(True),
        torch.tensor(seed, dtype=torch.int64, device=DEVICE),
        input_ids.clone(),
        torch.zeros(TOKENS, dtype=torch.bool, device=DEVICE),
        disc_logits.clone().requires_grad_(True),
    )


def _run(step, seed):
    """Forward and backward; everything the caller observes: outputs, mutated buffers, both gradients."""
    args = _step_args(seed)
    loss, samples, n_correct, counts = step(*args)
    loss.backward()
    gen_logits, _, disc_input_ids, replaced, disc_logits = args
    return (
        loss.detach(),
        samples,
        n_correct,
        counts,
        disc_input_ids,
        replaced,
        gen_logits.grad,
        disc_logits.grad,
    )


@pytest.mark.parametrize("path", PATHS)
def test_no_graph_breaks(path):
    explanation = torch._dynamo.explain(_step_fn(path))(*_step_args(3))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("path", PATHS)
def test_compiled_matches_eager_and_a_new_seed_does_not_recompile(path):
    torch._dynamo.reset()
    step = _step_fn(path)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    samples_by_seed = []
    for seed in (3, 4, 5):
        eager = _run(step, seed)
        graph = _run(compiled, seed)
        # aot_eager runs the same kernels and aten ops: identical results, not merely close.
        for name, a, b in zip(
            ("loss", "samples", "n_correct", "counts", "disc_input_ids", "replaced", "gen grad", "disc grad"),
            graph,
            eager,
            strict=True,
        ):
            assert torch.equal(a, b), (name, a, b)
        samples_by_seed.append(graph[1])
    assert counter.frame_count == 1  # one compile for three seed values
    # The seed reached the compiled graph as an input, not as a constant baked in at the first call.
    assert not torch.equal(samples_by_seed[0], samples_by_seed[1])


def test_triton_ops_are_single_graph_nodes():
    """AOTAutograd's forward holds one node per op (the sampler's wrapped by auto_functionalized for its two
    mutated buffers), the backward one RTD rescale op and one multiply; no Triton launch is traced."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    compiled = torch.compile(
        _step_fn("triton"), backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True
    )
    compiled(*_step_args(3))[0].backward()
    forward, backward = graphs
    assert forward.count("torch.ops.alectra.sample_and_cross_entropy.default") == 1
    assert forward.count("torch.ops.alectra.rtd_loss.default") == 1
    assert backward.count("torch.ops.alectra.rtd_loss_backward.default") == 1
    assert "triton" not in forward + backward


class _OpRecorder(TorchDispatchMode):
    """Names of the ops dispatched while active (views and allocations included)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", PATHS)
def test_a_step_never_syncs_with_the_host(path):
    step = _step_fn(path)
    args = _step_args(3)
    with _OpRecorder() as recorder:
        step(*args)[0].backward()
    assert recorder.names and not SYNCING_OPS & set(recorder.names), sorted(set(recorder.names))


def test_launch_functions_never_sync_with_the_host():
    """Inside the custom ops: the launchers allocate, count valid rows and launch, nothing else. (In the
    interpreter the launches copy tensors through numpy: copies, no syncing op.)"""
    targets, valid, positions, mask, gen_logits, disc_logits, input_ids = _fixed_inputs()
    seed = torch.tensor(3, device=DEVICE)
    with _OpRecorder() as recorder:
        sample_and_cross_entropy_forward(
            gen_logits,
            targets,
            seed,
            valid,
            temperature=1.0,
            positions=positions,
            disc_input_ids=input_ids.clone(),
            replaced_labels=torch.zeros(TOKENS, dtype=torch.bool, device=DEVICE),
        )
        _, counts, grad = rtd_loss_forward(disc_logits, valid.new_zeros(TOKENS), mask)
        rtd_loss_backward(grad, counts, torch.ones((), device=DEVICE), torch.float32)
    assert recorder.names and not SYNCING_OPS & set(recorder.names), sorted(set(recorder.names))


def test_triton_path_dispatches_one_op_per_call_and_per_backward():
    """Host-light eager calls: with a tensor seed each public call is one dispatched op (the custom op, which
    launches its kernels inside), and each backward one op (a multiply; the RTD rescale op)."""
    targets, valid, positions, mask, gen_logits, disc_logits, input_ids = _fixed_inputs()
    x = gen_logits.clone().requires_grad_(True)
    d = disc_logits.clone().requires_grad_(True)
    seed = torch.tensor(3, device=DEVICE)
    disc_input_ids = input_ids.clone()
    replaced = torch.zeros(TOKENS, dtype=torch.bool, device=DEVICE)
    one = torch.ones((), device=DEVICE)
    calls = {}
    with _OpRecorder() as calls["sampling forward"]:
        gen_loss = sample_and_cross_entropy(
            x,
            targets,
            seed=seed,
            valid=valid,
            positions=positions,
            disc_input_ids=disc_input_ids,
            replaced_labels=replaced,
        )[0]
    with _OpRecorder() as calls["sampling backward"]:
        gen_loss.backward(one)
    with _OpRecorder() as calls["rtd forward"]:
        disc_loss = rtd_loss(d, replaced, mask)[0]
    with _OpRecorder() as calls["rtd backward"]:
        disc_loss.backward(one)
    counted = {name: [op for op in rec.names if op != "aten::detach"] for name, rec in calls.items()}
    assert counted == {
        "sampling forward": ["alectra::sample_and_cross_entropy"],
        "sampling backward": ["aten::mul.Tensor"],
        "rtd forward": ["alectra::rtd_loss"],
        "rtd backward": ["alectra::rtd_loss_backward"],
    }


def test_custom_ops_pass_torch_library_opcheck():
    """torch.library.opcheck: schema (declared mutations), fake implementations vs real outputs, autograd
    registration, and AOTAutograd dispatch, each op on the step's inputs."""
    targets, valid, positions, mask, gen_logits, disc_logits, input_ids = _fixed_inputs()
    seed = torch.tensor(3, device=DEVICE)
    replaced = torch.zeros(TOKENS, dtype=torch.bool, device=DEVICE)
    torch.library.opcheck(
        torch.ops.alectra.sample_and_cross_entropy.default,
        (gen_logits, targets, seed, valid, 1.0, positions, input_ids.clone(), replaced),
    )
    torch.library.opcheck(
        torch.ops.alectra.rtd_loss.default, (disc_logits.clone().requires_grad_(True), replaced, mask)
    )
    _, counts, grad = rtd_loss_forward(disc_logits, replaced, mask)
    torch.library.opcheck(
        torch.ops.alectra.rtd_loss_backward.default,
        (grad, counts, torch.ones((), device=DEVICE), torch.bfloat16),
    )
