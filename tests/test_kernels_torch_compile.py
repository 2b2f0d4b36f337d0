"""Both kernel families inside torch.compile: registered custom ops, no graph breaks, compiled == eager, a new
seed is not a recompile, and a call neither synchronises with the host nor dispatches more than its op
(counted with benchmarks/bench_kernels.py's OpCounter).

One small step calls both ops the way the model chains them: the sampler scatters into `replaced`, which the
RTD loss then reads, so functionalisation of the mutated buffers is exercised too. Three paths: the Triton
kernels (interpreter on CPU, tests/conftest.py), the bit-exact reference ("philox") and the CPU fast sampler
("inverse_cdf"); the two reference paths use the RTD reference.
"""

import functools
import importlib.util
import pathlib

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from kernels.rtd_loss import rtd_loss, rtd_loss_forward
from kernels.sampling import sample_and_cross_entropy, sample_and_cross_entropy_reference

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


def _op_counter():
    """benchmarks/bench_kernels.py's OpCounter: top-level dispatched ops, and the device work (aten ops inside
    the custom ops too, and the Triton launches, which the interpreter's own tensor copies stay out of)."""
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    counter = bench.OpCounter()
    return counter, counter.launches_of(*bench.project_kernels())


@pytest.mark.parametrize("path", PATHS)
def test_a_step_never_syncs_with_the_host(path):
    """Forward and backward, inside the custom ops included: no op that reads a value back to the host."""
    step = _step_fn(path)
    args = _step_args(3)
    counter, launches = _op_counter()
    with counter, launches:
        step(*args)[0].backward()
    seen = set(counter.device)
    assert seen and not SYNCING_OPS & seen, sorted(seen)
    if path == "triton":
        assert {"triton:sample_ce_fwd_kernel", "triton:rtd_loss_bwd_kernel", "aten::sum"} <= seen


def test_triton_path_dispatches_one_op_per_call_and_per_backward():
    """Host-light eager calls: with a tensor seed each public call dispatches one op (its custom op, which
    launches the kernels inside), and each backward one (a multiply; the RTD rescale op)."""
    targets, valid, positions, mask, gen_logits, disc_logits, input_ids = _fixed_inputs()
    x = gen_logits.clone().requires_grad_(True)
    d = disc_logits.clone().requires_grad_(True)
    seed = torch.tensor(3, device=DEVICE)
    disc_input_ids = input_ids.clone()
    replaced = torch.zeros(TOKENS, dtype=torch.bool, device=DEVICE)
    one = torch.ones((), device=DEVICE)
    counted = {}
    counter, launches = _op_counter()
    with counter, launches:
        gen_loss = sample_and_cross_entropy(
            x,
            targets,
            seed=seed,
            valid=valid,
            positions=positions,
            disc_input_ids=disc_input_ids,
            replaced_labels=replaced,
        )[0]
    counted["sampling forward"] = counter
    for name, run in (
        ("sampling backward", lambda: gen_loss.backward(one)),
        ("rtd forward", lambda: counted.__setitem__("rtd loss", rtd_loss(d, replaced, mask)[0])),
        ("rtd backward", lambda: counted.pop("rtd loss").backward(one)),
    ):
        counter, launches = _op_counter()
        with counter, launches:
            run()
        counted[name] = counter
    dispatched = {name: dict(counter.dispatched) for name, counter in counted.items()}
    device = {name: sum(counter.device.values()) for name, counter in counted.items()}
    assert dispatched == {
        "sampling forward": {"alectra::sample_and_cross_entropy": 1},
        "sampling backward": {"aten::mul.Tensor": 1},
        "rtd forward": {"alectra::rtd_loss": 1},
        "rtd backward": {"alectra::rtd_loss_backward": 1},
    }
    # valid.sum() + the row kernel + the finishing kernel; two RTD launches; one each backward.
    assert device == {"sampling forward": 3, "sampling backward": 1, "rtd forward": 2, "rtd backward": 1}


def test_custom_ops_pass_torch_library_opcheck():
    """torch.library.opcheck: schema (declared mutations), fake implementations vs real outputs, autograd
    registration, and AOTAutograd dispatch, each op on the step's inputs."""
    targets, valid, positions, mask, gen_logits, disc_logits, input_ids = _fixed_inputs()
    seed = torch.tensor(3, device=DEVICE)
    replaced = torch.zeros(TOKENS, dtype=torch.bool, device=DEVICE)
    torch.library.opcheck(
        torch.ops.alectra.sample_and_cross_entropy.default,
        (gen_logits, targets, seed, valid, positions, input_ids.clone(), replaced),
        {"temperature": 1.0},
    )
    torch.library.opcheck(
        torch.ops.alectra.rtd_loss.default, (disc_logits.clone().requires_grad_(True), replaced, mask)
    )
    _, counts, grad = rtd_loss_forward(disc_logits, replaced, mask)
    torch.library.opcheck(
        torch.ops.alectra.rtd_loss_backward.default,
        (grad, counts, torch.ones((), device=DEVICE), torch.bfloat16),
    )
