"""The model's training step is one graph and never waits for the device (issue 12, items 3 and 4).

- forward (masking + generator + sampling + discriminator + RTD loss): `torch._dynamo.explain` sees one
  graph and no break, for the CPU path (kernels="torch": Philox reference sampler and RTD reference) and the
  Triton path (custom ops, interpreter on CPU);
- backward: compiled autograd traces it into one graph with no break, for both paths;
- `torch.compile(model, backend="aot_eager")` over 30 steps of real demo batches (line pairs: every batch
  padded differently, every batch with its own masked count; and batches with no padding at all), a new seed
  tensor value per step, AdamW in between: compiled once, losses and metric counts equal to eager's;
- nothing reads tensor data on the host: forward and backward run on the meta device (where any
  `.item()`, `nonzero`, boolean index or `.tolist()` raises), and on CPU benchmarks/bench_kernels.py's
  OpCounter sees no syncing op, inside the custom ops too.
"""

import copy
import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from alectra.model import ElectraPretrainingModel
from alectra.presets import get_preset
from alectra.seeds import step_seed
from tests.test_kernels_torch_compile import SYNCING_OPS as KERNEL_SYNCING_OPS
from tests.test_kernels_torch_compile import _op_counter  # benchmarks/bench_kernels.py's OpCounter

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
VOCAB = 100
# Ops that make the host wait for the device (a value read back, a data-dependent shape).
SYNCING_OPS = KERNEL_SYNCING_OPS | {"aten::_unique2", "aten::bincount"}


def tiny(**overrides):
    return dataclasses.replace(get_preset("tiny"), **overrides)


def build(config, vocab_size=VOCAB, specials=SPECIALS) -> ElectraPretrainingModel:
    torch.manual_seed(0)
    return ElectraPretrainingModel(config, vocab_size=vocab_size, special_token_ids=specials)


def small_batch(device="cpu"):
    """(B, T) = (3, 16): [CLS] ... [SEP], two rows padded, one of them to a few tokens."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (3, 16), generator=gen)
    ids[:, 0] = SPECIALS["cls"]
    attention_mask = torch.ones_like(ids)
    for row, length in ((1, 11), (2, 5)):
        ids[row, length - 1] = SPECIALS["sep"]
        ids[row, length:] = SPECIALS["pad"]
        attention_mask[row, length:] = 0
    ids[0, -1] = SPECIALS["sep"]
    token_type_ids = torch.zeros_like(ids)
    return tuple(t.to(device) for t in (ids, attention_mask, token_type_ids))


@pytest.mark.parametrize("masking", ["electra", "bernoulli"])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_forward_is_one_graph(kernels, masking):
    model = build(tiny(kernels=kernels, masking=masking))

    def forward(ids, attention_mask, token_type_ids, seed):
        out = model(ids, attention_mask, token_type_ids, seed=seed)
        return out.loss, out.metrics

    explanation = torch._dynamo.explain(forward)(*small_batch(), torch.tensor(12345))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_backward_is_one_graph(kernels):
    """Compiled autograd hands the whole backward (the custom ops' backward included) to Dynamo: one graph
    and no break. Static shapes (dynamic=False): symbolic sizes only slow the trace down (~30x here)."""
    torch._dynamo.reset()
    counters.clear()
    model = build(tiny(kernels=kernels))
    out = model(*small_batch(), seed=torch.tensor(7))
    backend = CompileCounterWithBackend("eager")
    with torch._dynamo.compiled_autograd._enable(
        lambda graph: torch.compile(graph, backend=backend, dynamic=False), dynamic=False
    ):
        out.loss.backward()
    assert backend.frame_count == 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert model.shared_embeddings.word_embeddings.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def demo_batches(tmp_path_factory):
    """30 real (4, 32) batches of the demo corpus: 26 of the seed's line pairs (each padded differently) and,
    at steps 5, 12, 19 and 26, ELECTRA-packed ones (full rows: no padding at all)."""
    from alectra.data.datasets import build_pretraining_datasets
    from alectra.data.loader import collate_examples
    from alectra.storage.manifest import load_manifest
    from data_prep import prepare_demo

    path = prepare_demo(tmp_path_factory.mktemp("data") / "demo", vocab_size=1000, max_documents=120)
    tokenizer = load_manifest(path)["tokenizer"]
    datasets = {
        kind: build_pretraining_datasets(
            [str(path)],
            None,
            max_seq_length=32,
            seed=0,
            valid_fraction=0.0,
            num_train_samples=None,
            examples=kind,
        )[0]
        for kind in ("line_pairs", "electra")
    }
    batches = []
    for step in range(30):
        kind = "electra" if step % 7 == 5 else "line_pairs"
        batches.append(collate_examples([datasets[kind][step * 4 + j] for j in range(4)]))
    return batches, tokenizer["vocab_size"], tokenizer["special_tokens"]


@pytest.mark.parametrize("masking", ["electra", "bernoulli"])
def test_compiled_training_equals_eager_and_never_recompiles(demo_batches, masking):
    """kernels="auto" (the CPU training path: inverse-CDF sampler, RTD reference), dropout on (torch's RNG
    reseeded before each step, as the trainer does). aot_eager runs the same aten ops as eager, so losses and
    counts are equal, not merely close, over 30 optimizer steps."""
    batches, vocab_size, specials = demo_batches
    padding = {int(b["attention_mask"].sum()) for b in batches}
    assert len(padding) > 10 and 4 * 32 in padding  # varying padding, and batches with none
    torch._dynamo.reset()
    eager = build(tiny(masking=masking), vocab_size, specials)
    graph_model = copy.deepcopy(eager)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(graph_model, backend=backend)
    curves = {}
    for name, model, run in (("eager", eager, eager), ("compiled", graph_model, compiled)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        curve = []
        for step, batch in enumerate(batches):
            torch.manual_seed(step)  # dropout
            seed = torch.tensor(step_seed(1234, step, 0))
            out = run(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], seed=seed)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            curve.append([out.loss.item(), *(int(v) for v in out.metrics.values())])
        curves[name] = torch.tensor(curve, dtype=torch.float64)  # (30, 1 + 8)
    assert backend.frame_count == 1, "recompiled"
    assert torch.equal(curves["compiled"], curves["eager"])
    masked_counts = curves["eager"][:, 2]  # gen_total
    assert len(set(masked_counts.tolist())) >= 3
    assert curves["eager"][-5:, 0].mean() < curves["eager"][:5, 0].mean()


@pytest.mark.parametrize("masking", ["electra", "bernoulli"])
@pytest.mark.parametrize("kernels", ["auto", "torch", "triton"])
def test_forward_and_backward_read_no_tensor_data(kernels, masking):
    """On the meta device a tensor has no data: `.item()`, `nonzero`, a boolean index, `.tolist()` or any
    data-dependent shape raises. The whole step runs there."""
    with torch.device("meta"):
        model = build(tiny(kernels=kernels, masking=masking))
        seed = torch.tensor(3)
    ids, attention_mask, token_type_ids = small_batch("meta")
    out = model(ids, attention_mask, token_type_ids, seed=seed)
    out.loss.backward()
    assert out.loss.device.type == "meta"
    assert model.shared_embeddings.word_embeddings.weight.grad.shape == (VOCAB, 32)


@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_a_step_never_syncs_and_never_copies_to_the_host(kernels, monkeypatch):
    model = build(tiny(kernels=kernels, masking="bernoulli"))
    batch = small_batch()
    host_copies = []

    def recorded(name, original):
        def method(tensor, *args, **kwargs):
            host_copies.append(name)
            return original(tensor, *args, **kwargs)

        return method

    for name in ("item", "tolist", "numpy", "cpu"):  # the Tensor methods that copy device -> host on a GPU
        monkeypatch.setattr(torch.Tensor, name, recorded(name, getattr(torch.Tensor, name)))
    counter, launches = _op_counter()
    with counter, launches:
        model(*batch, seed=torch.tensor(5)).loss.backward()
    monkeypatch.undo()
    seen = set(counter.device)
    assert not SYNCING_OPS & seen, sorted(SYNCING_OPS & seen)
    assert not host_copies, host_copies
    assert {"aten::topk", "aten::index_select", "aten::scaled_dot_product_attention"} & seen
    if kernels == "triton":
        assert {"triton:sample_ce_fwd_kernel", "triton:rtd_loss_fwd_kernel"} <= seen
