"""Model configuration: one typed dataclass and the named presets.

Sizes follow the ELECTRA paper (Clark et al., 2020, Table 6 / Appendix A) and google-research/electra
`configure_pretraining.py`: the generator keeps the discriminator's depth and embedding size but scales
width, FFN and heads by `generator_hidden_size` (1/4 for Small and Large, 1/3 for Base). `alectra-small` is
ELECTRA-Small with an ALBERT discriminator whose 12 layers share one parameter group (Google's recipe);
`alectra-small-owt` is the model of the seed's script (shoarora/lmtuners
`experiments/disc_lm_small/train_alectra_small.py` at 86f31ba), which trained the ALECTRA-Small-OWT card's
model: an ALBERT generator of 3 layers x 256, copy-initialised embeddings, a linear RTD head, gelu_new, and
the seed's masking (Bernoulli(0.15) per token, every masked token [MASK]).

Override fields with `dataclasses.replace(get_preset("electra-small"), mask_prob=0.2)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

KERNEL_CHOICES = ("auto", "triton", "torch")
HEAD_CHOICES = ("electra", "linear")
TYING_CHOICES = ("shared", "untied", "copied")
MASKING_CHOICES = ("electra", "bernoulli")
TRUNCATION_PROBABILITY = 1e-6
"""Bernoulli masking: the capacity N is the smallest with P(more than N masked) <= this, per sequence."""


@dataclass(kw_only=True)
class ModelConfig:
    """Generator + discriminator architecture and the ELECTRA objective's hyper-parameters."""

    generator_arch: str = "electra"
    """HF `model_type` of the generator, built with `AutoModelForMaskedLM` ("bert", "electra", "albert")."""
    discriminator_arch: str = "electra"
    """HF `model_type` of the discriminator, built with `AutoModelForTokenClassification`, one logit."""
    embedding_size: int = 128
    """Width of the shared embeddings (word, position, token type). A BERT network has no embedding->hidden
    projection, so a BERT generator/discriminator needs hidden_size == embedding_size."""
    max_position_embeddings: int = 512
    """Rows of the shared position-embedding table (longest sequence the model accepts)."""
    type_vocab_size: int = 2
    """Rows of the shared token-type (segment) embedding table."""
    generator_hidden_size: int = 64
    """Generator hidden width."""
    generator_num_layers: int = 12
    """Generator transformer layers."""
    generator_num_heads: int = 1
    """Generator attention heads (must divide generator_hidden_size)."""
    generator_intermediate_size: int = 256
    """Generator feed-forward width."""
    generator_num_hidden_groups: int = 1
    """ALBERT generator only: number of distinct parameter groups the layers cycle through."""
    discriminator_hidden_size: int = 256
    """Discriminator hidden width."""
    discriminator_num_layers: int = 12
    """Discriminator transformer layers."""
    discriminator_num_heads: int = 4
    """Discriminator attention heads (must divide discriminator_hidden_size)."""
    discriminator_intermediate_size: int = 1024
    """Discriminator feed-forward width."""
    discriminator_num_hidden_groups: int = 1
    """ALBERT discriminator only: number of distinct parameter groups (1 = all layers share weights)."""
    discriminator_head: str = "electra"
    """Replaced-token-detection head. "electra": dense(H) + activation + dense(1), google-research/electra
    `_get_discriminator_output` and HF `ElectraForPreTraining`'s `discriminator_predictions`; "linear": the
    seed's dropout + dense(2) with a softmax over {original, replaced} (lmtuners AlbertForTokenClassification
    with the config's default 2 labels), trained through the logit difference l1 - l0, which gives the same
    loss and gradients."""
    hidden_act: str = "gelu"
    """Activation of the feed-forward blocks and heads (the reference uses exact GELU; ALBERT's default, which
    the seed kept, is "gelu_new")."""
    hidden_dropout_prob: float = 0.1
    """Dropout on embeddings and hidden states (reference: 0.1)."""
    attention_dropout_prob: float = 0.1
    """Dropout on attention probabilities (reference: 0.1)."""
    initializer_range: float = 0.02
    """Std of the truncated-normal initialiser (reference: 0.02)."""
    masking: str = "electra"
    """Which positions are masked (alectra.masking). "electra": google-research/electra's exact count per
    sequence, max(1, min(N, round(mask_prob * real tokens))), uniform among the candidates. "bernoulli": the
    seed's (lmtuners `masked_lm.py`), every candidate independently with probability mask_prob, no minimum,
    at most N kept (the seed's recipe also sets mask_token_prob = 1: every masked token becomes [MASK])."""
    mask_prob: float = 0.15
    """Fraction of real tokens masked per sequence (reference `mask_prob`: 0.15; 0.25 for Large)."""
    mask_token_prob: float = 0.85
    """Of the masked positions, the fraction replaced by [MASK]; the rest keep the original token."""
    max_predictions: int | None = None
    """N, the masked slots per sequence (the generator always runs on batch x N rows); None derives it from
    the sequence length, `max_predictions_for`."""
    disc_weight: float = 50.0
    """Weight of the discriminator's RTD loss in the total loss (reference `disc_weight`: 50)."""
    temperature: float = 1.0
    """Temperature of the Gumbel-max sampling from the generator (reference: 1.0)."""
    embedding_tying: str = "shared"
    """"shared": one embedding module (word, position, token type, LayerNorm) for both networks, the
    reference's default (`untied_generator_embeddings=False`). "untied": each network has its own, initialised
    independently (the reference's `untied_generator_embeddings=True`). "copied": each network has its own,
    and the discriminator's word, position and token-type tables start as copies of the generator's
    (LayerNorms separate): what the seed's `tie_weights`, `nn.Parameter(weight.clone())`, actually does.
    The generator's output layer always multiplies by the generator's word-embedding matrix."""
    kernels: str = "auto"
    """"triton": the Triton kernels; "torch": their PyTorch references (bit-identical samples, but the
    reference's Philox emulation is slow on CPU); "auto": Triton on CUDA, elsewhere the RTD reference and
    a torch-RNG sampler (`kernels.sampling.sample_and_cross_entropy_reference(noise="inverse_cdf")`: the same
    distribution, ~100x faster)."""

    def __post_init__(self) -> None:
        positive = [
            f.name for f in dataclasses.fields(self) if f.type in ("int",) and getattr(self, f.name) < 1
        ]
        if positive:
            raise ValueError(f"ModelConfig.{positive[0]} must be >= 1, got {getattr(self, positive[0])}")
        for name in ("generator", "discriminator"):
            hidden = getattr(self, f"{name}_hidden_size")
            heads = getattr(self, f"{name}_num_heads")
            if hidden % heads:
                raise ValueError(
                    f"ModelConfig.{name}_num_heads={heads} must divide {name}_hidden_size={hidden}"
                )
            if getattr(self, f"{name}_arch") == "bert" and hidden != self.embedding_size:
                raise ValueError(
                    f"ModelConfig.{name}_arch='bert' has no embedding projection: "
                    f"{name}_hidden_size={hidden} must equal "
                    f"embedding_size={self.embedding_size} (or use 'electra'/'albert')"
                )
        for name in ("mask_prob", "mask_token_prob", "hidden_dropout_prob", "attention_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1], got {value}")
        if not 0.0 < self.mask_prob:
            raise ValueError(f"ModelConfig.mask_prob must be > 0, got {self.mask_prob}")
        if self.max_predictions is not None and self.max_predictions < 1:
            raise ValueError(f"ModelConfig.max_predictions must be >= 1 or None, got {self.max_predictions}")
        if self.disc_weight < 0:
            raise ValueError(f"ModelConfig.disc_weight must be >= 0, got {self.disc_weight}")
        if self.temperature <= 0:
            raise ValueError(f"ModelConfig.temperature must be > 0, got {self.temperature}")
        for name, choices in (
            ("kernels", KERNEL_CHOICES),
            ("discriminator_head", HEAD_CHOICES),
            ("embedding_tying", TYING_CHOICES),
            ("masking", MASKING_CHOICES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"ModelConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")

    def max_predictions_for(self, seq_len: int) -> int:
        """N, the masked slots per sequence at length `seq_len` (the one place N is derived).

        `max_predictions` when set. Otherwise, "electra": the reference's int((mask_prob + 0.005) * seq_len)
        (`configure_pretraining.py:106-107`), a cap on its exact count. "bernoulli": the smallest N with
        P(Binomial(seq_len - 2, mask_prob) > N) <= TRUNCATION_PROBABILITY, seq_len - 2 being the most
        candidates a sequence can have ([CLS] ... [SEP]): 40 at 128 (P = 6.4e-7), 117 at 512.
        """
        if self.max_predictions is not None:
            return self.max_predictions
        if self.masking == "bernoulli":
            return bernoulli_capacity(seq_len - 2, self.mask_prob, TRUNCATION_PROBABILITY)
        return max(1, int((self.mask_prob + 0.005) * seq_len))


@functools.cache
def bernoulli_capacity(candidates: int, mask_prob: float, tolerance: float) -> int:
    """The smallest N >= 1 with P(Binomial(candidates, mask_prob) > N) <= tolerance (exact, in log space)."""
    if candidates < 1 or mask_prob >= 1.0:
        return max(1, candidates)
    log_p, log_q = math.log(mask_prob), math.log1p(-mask_prob)
    tail = 0.0  # P(count > n), accumulated from the top
    for n in range(candidates, 0, -1):
        log_pmf = (
            math.lgamma(candidates + 1)
            - math.lgamma(n + 1)
            - math.lgamma(candidates - n + 1)
            + n * log_p
            + (candidates - n) * log_q
        )
        if tail + math.exp(log_pmf) > tolerance:  # P(count > n - 1) too large: n slots are needed
            return n
        tail += math.exp(log_pmf)
    return 1


def _electra_pair(*, hidden: int, embedding: int, layers: int, heads: int, ffn: int, gen_fraction: float):
    """Discriminator sizes plus the generator scaled by `gen_fraction` (reference `get_generator_config`)."""
    return dict(
        embedding_size=embedding,
        discriminator_hidden_size=hidden,
        discriminator_num_layers=layers,
        discriminator_num_heads=heads,
        discriminator_intermediate_size=ffn,
        generator_hidden_size=int(round(hidden * gen_fraction)),
        generator_num_layers=layers,
        generator_num_heads=max(1, int(round(heads * gen_fraction))),
        generator_intermediate_size=int(round(ffn * gen_fraction)),
    )


_SMALL = _electra_pair(hidden=256, embedding=128, layers=12, heads=4, ffn=1024, gen_fraction=0.25)

PRESETS: dict[str, dict] = {
    # Seconds per step on one CPU core at vocab ~8k; for tests and the CPU demo, not for quality.
    "tiny": dict(
        embedding_size=32,
        max_position_embeddings=128,
        discriminator_hidden_size=64,
        discriminator_num_layers=2,
        discriminator_num_heads=2,
        discriminator_intermediate_size=128,
        generator_hidden_size=32,
        generator_num_layers=2,
        generator_num_heads=1,
        generator_intermediate_size=64,
    ),
    "electra-small": _SMALL,
    "alectra-small": {**_SMALL, "discriminator_arch": "albert", "discriminator_num_hidden_groups": 1},
    # The seed's script (train_alectra_small.py at 86f31ba, lines 43-83): both networks ALBERT with
    # AlbertConfig defaults for what it does not set (gelu_new); generator 3 layers x 256, 1 head, FFN 1024.
    "alectra-small-owt": dict(
        generator_arch="albert",
        discriminator_arch="albert",
        embedding_size=128,
        max_position_embeddings=128,
        generator_hidden_size=256,
        generator_num_layers=3,
        generator_num_heads=1,
        generator_intermediate_size=1024,
        generator_num_hidden_groups=1,
        discriminator_hidden_size=256,
        discriminator_num_layers=12,
        discriminator_num_heads=4,
        discriminator_intermediate_size=1024,
        discriminator_num_hidden_groups=1,
        hidden_act="gelu_new",
        discriminator_head="linear",
        embedding_tying="copied",
        # lmtuners utils/masked_lm.py:9-13, 27-28 (rand_replace=False): Bernoulli(0.15), all -> [MASK].
        masking="bernoulli",
        mask_token_prob=1.0,
    ),
    "electra-base": _electra_pair(
        hidden=768, embedding=768, layers=12, heads=12, ffn=3072, gen_fraction=1 / 3
    ),
    "electra-large": {
        **_electra_pair(hidden=1024, embedding=1024, layers=24, heads=16, ffn=4096, gen_fraction=0.25),
        "mask_prob": 0.25,
    },
}


def get_preset(name: str) -> ModelConfig:
    """Return a fresh ModelConfig for a named preset (see PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**PRESETS[name])
