"""alectra.optim: the no-decay rule, the two LR schedules, LAMB (against pytorch-lamb's math, on whole
tensors and on flat segmented tensors, the found_inf skip, no host sync, a fixed op count),
create_optimizer."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AlbertConfig,
    AlbertForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    ElectraConfig,
    ElectraForPreTraining,
)
from transformers.optimization import _get_linear_schedule_with_warmup_lr_lambda

from alectra.optim import (
    Lamb,
    SegmentLayout,
    create_optimizer,
    electra_multiplier,
    linear_multiplier,
    lr_multiplier,
    parameter_groups,
    uses_weight_decay,
)


def reference_lamb_step(groups: list[dict], state: dict, *, lr: float, eps: float = 1e-6) -> None:
    """cybertronai/pytorch-lamb `Lamb.step` (pytorch_lamb/lamb.py at d3ab8dc, betas 0.9/0.999): its math
    verbatim."""
    beta1, beta2 = 0.9, 0.999
    for group in groups:
        for p in group["params"]:
            st = state.setdefault(p, {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
            st["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
            st["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            weight_norm = p.data.pow(2).sum().sqrt().clamp(0, 10)
            adam_step = st["m"] / st["v"].sqrt().add(eps)
            if group["weight_decay"] != 0:
                adam_step.add_(p.data, alpha=group["weight_decay"])
            adam_norm = adam_step.pow(2).sum().sqrt()
            trust = 1 if weight_norm == 0 or adam_norm == 0 else weight_norm / adam_norm
            p.data.add_(adam_step, alpha=-lr * trust)


# ---- the no-decay rule -------------------------------------------------------------------------------------


def _tiny_models():
    common = dict(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    return {
        "electra": ElectraForPreTraining(ElectraConfig(embedding_size=8, **common)),
        "albert": AlbertForMaskedLM(AlbertConfig(embedding_size=8, **common)),
        "bert": BertForMaskedLM(BertConfig(**common)),
    }


@pytest.mark.parametrize("arch", ["electra", "albert", "bert"])
def test_no_decay_rule_is_electras_and_takes_every_layernorm_and_bias(arch):
    model = _tiny_models()[arch]
    names = [n for n, _ in model.named_parameters()]
    # google-research/electra optimization.py `_do_use_weight_decay`: re.search of each pattern.
    reference = {n for n in names if not any(re.search(r, n) for r in ["LayerNorm", "layer_norm", "bias"])}
    assert {n for n in names if uses_weight_decay(n)} == reference
    # On these models that is exactly: every matrix decays, every vector (LayerNorm, bias) does not.
    assert reference == {n for n, p in model.named_parameters() if p.dim() >= 2}
    decay, no_decay = parameter_groups(model, 0.01)
    assert len(decay["params"]) == len(reference) and no_decay["weight_decay"] == 0.0
    if arch == "albert":  # the seed's ["bias", "LayerNorm.weight"] would decay this one
        assert not uses_weight_decay(
            "albert.encoder.albert_layer_groups.0.albert_layers.0.full_layer_layer_norm.weight"
        )


# ---- schedules -------------------------------------------------------------------------------------------


def test_linear_schedule_is_hugging_faces():
    for total, warmup in ((100, 10), (50, 0), (10, 10), (500_000, 40_000)):
        for step in sorted({0, 1, warmup - 1, warmup, warmup + 1, total // 2, total - 1, total, total + 5}):
            if step < 0:
                continue
            want = _get_linear_schedule_with_warmup_lr_lambda(
                step, num_warmup_steps=warmup, num_training_steps=total
            )
            assert linear_multiplier(step, total_steps=total, warmup_steps=warmup) == want, (
                total,
                warmup,
                step,
            )


def test_the_two_schedules_differ_as_the_issue_says():
    """Card numbers (500k steps, 40k warmup): HF reaches the peak, ELECTRA's product peaks at 0.92."""
    electra = lr_multiplier("electra", total_steps=500_000, warmup_steps=40_000)
    linear = lr_multiplier("linear", total_steps=500_000, warmup_steps=40_000)
    assert linear(40_000) == 1.0 and electra(40_000) == pytest.approx(0.92)
    assert electra(0) == linear(0) == 0.0 and electra(500_000) == linear(500_000) == 0.0
    assert electra(5) == pytest.approx((1 - 5 / 500_000) * 5 / 40_000)
    assert electra_multiplier(5, total_steps=10, warmup_steps=0) == 0.5
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosine'"):
        lr_multiplier("cosine", total_steps=10, warmup_steps=1)


def test_schedule_survives_lambdalr_state_dict():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier("linear", total_steps=10, warmup_steps=2))
    sched.load_state_dict(sched.state_dict())
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


# ---- LAMB --------------------------------------------------------------------------------------------------

SHAPES = [(7, 5), (5,), (13,), (3, 4, 2)]


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES] + [torch.zeros(6)]  # a zero tensor: trust 1


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in _params()]


def test_lamb_equals_pytorch_lamb_on_whole_tensors():
    ours = [torch.nn.Parameter(p) for p in _params()]
    ref = [torch.nn.Parameter(p) for p in _params()]
    lamb = Lamb(
        [{"params": ours[:3], "weight_decay": 0.01}, {"params": ours[3:], "weight_decay": 0.0}], lr=2e-3
    )
    ref_groups, ref_state = (
        [{"params": ref[:3], "weight_decay": 0.01}, {"params": ref[3:], "weight_decay": 0.0}],
        {},
    )
    for step in range(20):
        for a, b, g in zip(ours, ref, _grads(step), strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        lamb.step()
        reference_lamb_step(ref_groups, ref_state, lr=2e-3)
    for a, b, p0 in zip(ours, ref, _params(), strict=True):
        assert torch.equal(a, b)  # same operations in the same order: bit-equal
        assert not torch.equal(a, p0)


def _flat(tensors: list[torch.Tensor], pad: int = 3) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors] + [torch.zeros(pad)])


def _layout(pad: int = 3) -> SegmentLayout:
    n = len(_params())
    ids = torch.cat([torch.full((p.numel(),), k) for k, p in enumerate(_params())] + [torch.full((pad,), n)])
    return SegmentLayout(segment_ids=ids, num_segments=n)


def test_lamb_on_a_segmented_flat_tensor_equals_per_tensor_lamb():
    """One flat tensor (as ZeRO hands it) with a segment per parameter and padding: each segment gets the
    trust ratio of its own tensor; padding stays 0."""
    flat = torch.nn.Parameter(_flat(_params()))
    lamb = Lamb([{"params": [flat], "weight_decay": 0.01}], lr=2e-3)
    lamb.layouts[flat] = _layout()
    ref = [torch.nn.Parameter(p) for p in _params()]
    ref_state: dict = {}
    for step in range(20):
        flat.grad = _flat(_grads(step))
        for p, g in zip(ref, _grads(step), strict=True):
            p.grad = g
        lamb.step()
        reference_lamb_step([{"params": ref, "weight_decay": 0.01}], ref_state, lr=2e-3)
    # Only the summation order of the squares differs (index_add vs .sum()).
    torch.testing.assert_close(flat.detach(), _flat(ref).detach(), atol=1e-6, rtol=1e-6)
    assert torch.equal(flat.detach()[-3:], torch.zeros(3))
    # Treating the flat tensor as one tensor (no layout) is measurably different: the test can fail.
    whole = torch.nn.Parameter(_flat(_params()))
    lamb_whole = Lamb([{"params": [whole], "weight_decay": 0.01}], lr=2e-3)
    whole.grad = _flat(_grads(0))
    lamb_whole.step()
    assert (whole.detach() - _flat(_params())).abs().max() > 1e-4


@pytest.mark.parametrize("layout", [False, True], ids=["whole", "segmented"])
def test_found_inf_skips_without_touching_params_or_state(layout):
    p = torch.nn.Parameter(_flat(_params()) if layout else _params()[0])
    lamb = Lamb([{"params": [p], "weight_decay": 0.01}], lr=2e-3)
    if layout:
        lamb.layouts[p] = _layout()
    p.grad = torch.ones_like(p)
    lamb.step()  # state exists
    before = p.detach().clone()
    state = {k: v.clone() for k, v in lamb.state[p].items()}
    lamb.found_inf = torch.ones(())
    p.grad = torch.full_like(p, float("inf"))
    p.grad[0] = float("nan")
    lamb.step()
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(lamb.state[p][k], v) for k, v in state.items())
    lamb.found_inf = torch.zeros(())
    p.grad = torch.ones_like(p)
    lamb.step()
    assert not torch.equal(p.detach(), before) and lamb.state[p]["step"] == 2


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops_of_one_step(num_params: int) -> list[str]:
    sizes = [3 + k % 5 for k in range(num_params)]
    flat = torch.nn.Parameter(torch.randn(sum(sizes)))
    ids = torch.repeat_interleave(torch.arange(num_params), torch.tensor(sizes))
    lamb = Lamb([{"params": [flat], "weight_decay": 0.01}], lr=1e-3)
    lamb.layouts[flat] = SegmentLayout(segment_ids=ids, num_segments=num_params)
    lamb.found_inf = torch.zeros(())
    flat.grad = torch.randn_like(flat)
    lamb.step()  # state allocation happens once, outside the count
    with _OpLog() as log:
        lamb.step()
    return log.ops


def test_lamb_step_is_a_fixed_op_sequence_with_no_host_sync():
    """The same tensor ops for 3 or 300 parameters in a partition (no per-parameter loop), and nothing that
    reads a tensor back to the host (.item(), bool(tensor) dispatch to aten._local_scalar_dense)."""
    few, many = _ops_of_one_step(3), _ops_of_one_step(300)
    assert few == many
    assert not [op for op in few if "_local_scalar_dense" in op or "item" in op], few
    assert len(few) < 50, few  # about 40 tensor ops per partition (and per parameter group)


def test_lamb_refuses_low_precision_weights():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="fp32"):
        Lamb([p], lr=1e-3).step()


def test_create_optimizer_builds_both():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    kwargs = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    assert isinstance(create_optimizer(model, name="lamb", **kwargs), Lamb)
    adamw = create_optimizer(model, name="adamw", **kwargs)
    assert isinstance(adamw, torch.optim.AdamW) and [g["weight_decay"] for g in adamw.param_groups] == [
        0.01,
        0.0,
    ]
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        create_optimizer(model, name="sgd", **kwargs)
