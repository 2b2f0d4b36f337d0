"""ElectraPretrainingModel: generator (masked LM) + discriminator (replaced-token detection) in one nn.Module.

Follows google-research/electra `run_pretraining.py` (`PretrainingModel`):
  1. mask the input (`alectra.masking`, the reference's `pretrain_helpers.mask` or the seed's Bernoulli
     masking) into N static slots per sequence, each with a `valid` flag;
  2. run the generator encoder on the whole masked sequence, then its MLM head and the vocabulary
     projection only at the B x N slots (the reference gathers `masked_lm_positions` before the output
     layer, also padded to a static max_predictions_per_seq with weight 0; a plain HF `*ForMaskedLM` would
     project all B*T positions);
  3. Gumbel-max sample replacements from the generator (no gradient), put them into the discriminator input
     and label a position "replaced" only where the sample differs from the original;
  4. loss = generator CE (mean over valid slots) + disc_weight * sigmoid RTD loss (mean over real tokens).

The forward never waits for the device: the slot count is static, the seed is a device tensor, the metric
counts stay on the device, so it is one graph for torch.compile (tests/test_model_compile.py).

Weight tying (`ModelConfig.embedding_tying`, default "shared") is real (the reference reuses the
"electra/embeddings" variable scope): word, position and token-type embeddings and the embedding LayerNorm
are ONE module held by both networks, and the generator's output layer multiplies by that word-embedding
matrix plus its own bias. Each network keeps its own embedding->hidden projection (ELECTRA
`embeddings_project`, ALBERT `embedding_hidden_mapping_in`). "copied" reproduces the seed (lmtuners), whose
`tie_weights` copies the generator's tables into the discriminator at initialisation.

The discriminator's RTD head (`ModelConfig.discriminator_head`): "electra" is HF's `ElectraForPreTraining`
for an ELECTRA discriminator (dense + activation + dense(1), the reference's), and the same
`discriminator_predictions` on top of any other encoder; "linear" is `*ForTokenClassification` with two
labels (the seed's), whose logit difference is the RTD logit.

Shape legend: B batch, T sequence length, N masked slots per sequence, V vocabulary, H hidden width.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForTokenClassification,
    ElectraForPreTraining,
    PretrainedConfig,
)
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.electra.modeling_electra import ElectraDiscriminatorPredictions

from alectra.masking import mask_tokens, seed_tensor
from alectra.presets import ModelConfig
from alectra.seeds import Stream, derive_seed
from alectra.storage.manifest import MODEL_SPECIAL_TOKENS
from kernels.rtd_loss import rtd_loss
from kernels.sampling import sample_and_cross_entropy, sample_and_cross_entropy_reference

METRIC_KEYS = (
    "gen_correct",
    "gen_total",
    "disc_correct",
    "disc_total",
    "replaced_tp",
    "replaced_fp",
    "replaced_fn",
    "replaced_total",
)


@dataclass(kw_only=True)
class ElectraOutput:
    """What one forward pass returns."""

    loss: torch.Tensor
    """Scalar fp32, differentiable: gen_loss + disc_weight * disc_loss."""
    gen_loss: torch.Tensor
    """Scalar fp32, detached: generator cross-entropy, mean over the valid masked slots."""
    disc_loss: torch.Tensor
    """Scalar fp32, detached: sigmoid RTD loss, mean over real (non-padding) tokens."""
    metrics: dict[str, torch.Tensor]
    """Detached int64 sums/counts (METRIC_KEYS) that add up across ranks and micro-batches."""


def finalize_metrics(summed: dict) -> dict[str, float]:
    """Turn summed counts into gen/disc accuracy, precision/recall on replaced tokens, replaced fraction."""
    value = {k: float(summed[k]) for k in METRIC_KEYS}

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else float("nan")

    tp, fp, fn = value["replaced_tp"], value["replaced_fp"], value["replaced_fn"]
    return {
        "gen_accuracy": ratio(value["gen_correct"], value["gen_total"]),
        "disc_accuracy": ratio(value["disc_correct"], value["disc_total"]),
        "replaced_precision": ratio(tp, tp + fp),
        "replaced_recall": ratio(tp, tp + fn),
        "replaced_fraction": ratio(value["replaced_total"], value["disc_total"]),
    }


def build_hf_configs(config: ModelConfig, vocab_size: int) -> tuple[PretrainedConfig, PretrainedConfig]:
    """HF configs for `config`: generator (`*ForMaskedLM`), discriminator (`*ForTokenClassification`)."""

    def make(prefix: str, **extra) -> PretrainedConfig:
        arch = getattr(config, f"{prefix}_arch")
        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=getattr(config, f"{prefix}_hidden_size"),
            num_hidden_layers=getattr(config, f"{prefix}_num_layers"),
            num_attention_heads=getattr(config, f"{prefix}_num_heads"),
            intermediate_size=getattr(config, f"{prefix}_intermediate_size"),
            max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size,
            hidden_act=config.hidden_act,
            hidden_dropout_prob=config.hidden_dropout_prob,
            attention_probs_dropout_prob=config.attention_dropout_prob,
            initializer_range=config.initializer_range,
            **extra,
        )
        if arch != "bert":
            kwargs["embedding_size"] = config.embedding_size
        if arch == "albert":
            kwargs["num_hidden_groups"] = getattr(config, f"{prefix}_num_hidden_groups")
            kwargs["inner_group_num"] = 1
            kwargs["classifier_dropout_prob"] = config.hidden_dropout_prob
        try:
            return AutoConfig.for_model(arch, **kwargs)
        except ValueError as err:
            raise ValueError(
                f"ModelConfig.{prefix}_arch={arch!r} is not a Hugging Face model type: {err}"
            ) from None

    generator = make("generator")
    labels = ["replaced"] if config.discriminator_head == "electra" else ["original", "replaced"]
    discriminator = make(
        "discriminator",
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    return generator, discriminator


def embedding_size_of(hf_config: PretrainedConfig) -> int:
    """Width of a network's word embeddings (BERT-like models have no separate embedding_size)."""
    return getattr(hf_config, "embedding_size", None) or hf_config.hidden_size


def check_compatible(generator: PretrainedConfig, discriminator: PretrainedConfig) -> None:
    """Raise one clear ValueError when the two networks cannot share one embedding module."""
    fields = {
        "vocab_size": lambda c: c.vocab_size,
        "embedding size": embedding_size_of,
        "max_position_embeddings": lambda c: c.max_position_embeddings,
        "type_vocab_size": lambda c: c.type_vocab_size,
    }
    for name, get in fields.items():
        g, d = get(generator), get(discriminator)
        if g != d:
            raise ValueError(
                f"generator ({generator.model_type}) and discriminator ({discriminator.model_type}) cannot "
                f"share embeddings: {name} differs ({g} vs {d}); make them equal"
            )


def mlm_head(generator: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The generator's MLM head as a function (R, H) -> (R, V), applied to the gathered masked slots only."""
    if hasattr(generator, "generator_predictions"):  # ElectraForMaskedLM
        return lambda h: generator.generator_lm_head(generator.generator_predictions(h))
    for name in ("cls", "predictions", "lm_head"):  # BERT, ALBERT, RoBERTa-style
        if isinstance(getattr(generator, name, None), nn.Module):
            return getattr(generator, name)
    raise ValueError(
        f"{type(generator).__name__}: unknown MLM head layout; supported: BERT, ELECTRA, ALBERT, RoBERTa"
    )


class ElectraHeadDiscriminator(nn.Module):
    """Any HF encoder + ELECTRA's RTD head, with ElectraForPreTraining's parameter names (`<prefix>.*`,
    `discriminator_predictions.*`), for the "electra" head on a BERT or ALBERT discriminator."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        encoder = AutoModel.from_config(config, **_no_pooler(config))
        self.base_model_prefix = encoder.base_model_prefix
        setattr(self, self.base_model_prefix, encoder)
        self.discriminator_predictions = ElectraDiscriminatorPredictions(config)
        for layer in (self.discriminator_predictions.dense, self.discriminator_predictions.dense_prediction):
            nn.init.normal_(layer.weight, std=config.initializer_range)  # as HF initialises it
            nn.init.zeros_(layer.bias)

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.discriminator_predictions(self.base_model(**inputs).last_hidden_state)  # (B, T)


def _no_pooler(config: PretrainedConfig) -> dict:
    """`add_pooling_layer=False` where the architecture has a pooler (BERT, ALBERT): no loss trains it."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    params = inspect.signature(MODEL_MAPPING[type(config)].__init__).parameters
    return {"add_pooling_layer": False} if "add_pooling_layer" in params else {}


def build_discriminator(config: ModelConfig, hf_config: PretrainedConfig) -> nn.Module:
    """The discriminator network with the RTD head `config.discriminator_head` asks for."""
    if config.discriminator_head == "linear":
        return AutoModelForTokenClassification.from_config(hf_config)
    if hf_config.model_type == "electra":
        return ElectraForPreTraining(hf_config)
    return ElectraHeadDiscriminator(hf_config)


def rtd_logits(discriminator: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """(B, T) replaced-token logits of any discriminator `build_discriminator` makes: the "linear" head's
    two-way softmax over (original, replaced) is a sigmoid on l_replaced - l_original."""
    out = discriminator(**inputs)
    logits = out if isinstance(out, torch.Tensor) else out.logits  # (B, T) or (B, T, 2)
    return logits[..., 1] - logits[..., 0] if logits.dim() == 3 else logits


def encoder_attention_mask(config: PretrainedConfig, attention_mask: torch.Tensor, dtype: torch.dtype):
    """The 4-D attention mask `config`'s encoder uses, made without reading the mask on the host.

    Given the 2-D mask, HF's encoders (transformers masking_utils `sdpa_mask`) first ask whether any token is
    padded, `padding_mask.all()` in `_ignore_bidirectional_mask_sdpa`: a host sync in every encoder of every
    step, and a graph break. A 4-D mask is used as it is (`_preprocess_mask_arguments`), so the model passes
    one. For SDPA attention: additive, 0 where attended and -inf at padding, (B, 1, 1, T) in the embeddings'
    `dtype` (broadcast over heads and queries by `scaled_dot_product_attention`), made as log(mask) in 2 ops;
    a bool mask would be turned into exactly this inside every layer's SDPA call (`where(mask, 0, -inf)`:
    3 ops per layer). For another implementation: HF's own mask with the host check switched off.
    """
    if config._attn_implementation == "sdpa":
        return attention_mask.to(dtype).log()[:, None, None, :]  # (B, 1, 1, T): log 1 = 0, log 0 = -inf
    B, T = attention_mask.shape
    return create_bidirectional_mask(
        config=config,
        inputs_embeds=attention_mask.new_empty((B, T, 0), dtype=dtype),  # read for its shape, dtype, device
        attention_mask=attention_mask,
        allow_is_bidirectional_skip=False,
    )


def _pick_shared_embeddings(generator: nn.Module, discriminator: nn.Module) -> nn.Module:
    """The embedding module both networks can call: BertModel/ElectraModel pass `cache_length` to it,
    AlbertModel does not, so a mixed pair must share the module whose forward accepts both call styles."""
    disc_emb = discriminator.base_model.embeddings
    gen_emb = generator.base_model.embeddings
    disc_args = set(inspect.signature(disc_emb.forward).parameters)
    gen_args = set(inspect.signature(gen_emb.forward).parameters)
    return disc_emb if gen_args <= disc_args else gen_emb


def _drop_legacy_head_alias(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before the MLM head was looked up per call hold a BERT/ALBERT generator's head
    twice: as `generator.<head>.*` and as `_mlm_head.*` (the stored head was a registered submodule). The
    second name is the same tensors; dropping it lets those checkpoints load (resume, export) today."""
    for key in [k for k in state_dict if k.startswith(prefix + "_mlm_head.")]:
        del state_dict[key]


class ElectraPretrainingModel(nn.Module):
    """Generator + discriminator with tied embeddings; forward returns the ELECTRA loss and metric counts."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        vocab_size: int,
        special_token_ids: dict,
        hf_configs: tuple[PretrainedConfig, PretrainedConfig] | None = None,
    ) -> None:
        """hf_configs: optional (generator, discriminator) HF configs replacing the ones built from `config`
        (any `*ForMaskedLM` / `*ForTokenClassification` pair with compatible embeddings)."""
        super().__init__()
        missing = [k for k in MODEL_SPECIAL_TOKENS if k not in special_token_ids]
        if missing:
            raise ValueError(
                f"special_token_ids lacks {missing}; pass the tokenizer's ids (manifest special_tokens)"
            )
        bad = {k: v for k, v in special_token_ids.items() if not 0 <= int(v) < vocab_size}
        if bad:
            raise ValueError(f"special token ids {bad} are outside the vocabulary of size {vocab_size}")
        self.config = config
        self.vocab_size = vocab_size
        self.special_token_ids = {k: int(v) for k, v in special_token_ids.items()}
        gen_config, disc_config = (
            hf_configs if hf_configs is not None else build_hf_configs(config, vocab_size)
        )
        want_labels = 1 if config.discriminator_head == "electra" else 2
        if disc_config.num_labels != want_labels:
            raise ValueError(
                f"discriminator_head={config.discriminator_head!r} needs a discriminator config with "
                f"num_labels={want_labels}, got {disc_config.num_labels}"
            )
        if gen_config.vocab_size != vocab_size:
            raise ValueError(
                f"generator vocab_size {gen_config.vocab_size} != tokenizer vocab_size {vocab_size}"
            )
        check_compatible(gen_config, disc_config)

        self.generator = AutoModelForMaskedLM.from_config(gen_config)
        self.discriminator = build_discriminator(config, disc_config)
        self._tie_embeddings()
        mlm_head(self.generator)  # an unknown head layout fails here, not at the first step
        self.register_load_state_dict_pre_hook(_drop_legacy_head_alias)

    def _tie_embeddings(self) -> None:
        if self.config.embedding_tying != "shared":
            # Generator output layer = the generator's own word-embedding matrix + its bias.
            gen_emb, disc_emb = (net.base_model.embeddings for net in (self.generator, self.discriminator))
            self.generator.get_output_embeddings().weight = gen_emb.word_embeddings.weight
            if self.config.embedding_tying == "copied":  # lmtuners utils.tie_weights: Parameter(w.clone())
                with torch.no_grad():
                    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
                        getattr(disc_emb, name).weight.copy_(getattr(gen_emb, name).weight)
            return
        shared = _pick_shared_embeddings(self.generator, self.discriminator)
        self.generator.base_model.embeddings = shared
        self.discriminator.base_model.embeddings = shared
        # Generator output layer = shared word-embedding matrix + its own bias (reference `get_token_logits`).
        self.generator.get_output_embeddings().weight = shared.word_embeddings.weight

    @property
    def shared_embeddings(self) -> nn.Module:
        """The embedding module (word, position, token type, LayerNorm) both networks hold; when they are not
        shared (`embedding_tying`), the discriminator's own."""
        return self.discriminator.base_model.embeddings

    def _sampler(
        self, device: torch.device
    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The sampling + generator-CE implementation for this device (see ModelConfig.kernels)."""
        if self.config.kernels == "auto" and device.type != "cuda":
            # The bit-exact Philox reference costs ~40 ms per masked row at V = 30522 on a CPU (6 s of a
            # 15 s ELECTRA-Small step at batch 8); inverse-CDF sampling draws the same distribution from one
            # Philox uniform per row.
            return functools.partial(sample_and_cross_entropy_reference, noise="inverse_cdf")
        return functools.partial(sample_and_cross_entropy, use_triton=self._use_triton(device))

    def _use_triton(self, device: torch.device) -> bool:
        if self.config.kernels == "auto":
            return device.type == "cuda"
        return self.config.kernels == "triton"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        *,
        seed: torch.Tensor | int,
    ) -> ElectraOutput:
        """One ELECTRA step on int64 (B, T) inputs; masking and sampling are deterministic in `seed`.

        seed: int64 0-dim tensor on the inputs' device, read only by device ops, so a new value per step is
        neither a host sync nor a recompile of a compiled forward. An int in [0, 2^63) is accepted too and
        copied to the device (a host -> device copy per call; a compiled forward would specialise on it).
        Nothing here reads tensor data on the host: B x N generator rows every step (N =
        `ModelConfig.max_predictions_for(T)`), invalid slots weighted 0, metric counts left on the device.
        """
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {T} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        device = input_ids.device
        seed = seed_tensor(seed, device)
        masked = mask_tokens(
            input_ids,
            attention_mask,
            seed=derive_seed(seed, Stream.MASKING),
            special_token_ids=self.special_token_ids,
            mask_prob=self.config.mask_prob,
            mask_token_prob=self.config.mask_token_prob,
            max_predictions=self.config.max_predictions_for(T),
            masking=self.config.masking,
        )

        dtype = self.shared_embeddings.word_embeddings.weight.dtype
        gen_mask = encoder_attention_mask(self.generator.config, attention_mask, dtype)
        disc_mask = (
            gen_mask
            if self.generator.config._attn_implementation == self.discriminator.config._attn_implementation
            else encoder_attention_mask(self.discriminator.config, attention_mask, dtype)
        )
        gen_hidden = self.generator.base_model(
            input_ids=masked.input_ids, attention_mask=gen_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, T, Hg)
        row_starts = torch.arange(0, B * T, T, device=device).unsqueeze(1)  # (B, 1)
        positions = (masked.positions + row_starts).view(-1)  # (B*N,) flat indices into B*T
        valid = masked.valid.view(-1)  # (B*N,)
        # Looked up on every call, not stored: a stored closure would keep pointing at the original generator
        # in a copy.deepcopy of the model.
        head = mlm_head(self.generator)
        gen_logits = head(gen_hidden.reshape(B * T, -1).index_select(0, positions))  # (B*N, V)

        disc_input_ids = input_ids.reshape(-1).clone()  # (B*T,) samples scattered in below
        replaced = torch.zeros(B * T, dtype=torch.int64, device=device)  # (B*T,)
        gen_loss, _, gen_correct = self._sampler(device)(
            gen_logits,
            masked.targets.view(-1),
            seed=derive_seed(seed, Stream.SAMPLING),
            temperature=self.config.temperature,
            valid=valid,
            positions=positions,
            disc_input_ids=disc_input_ids,
            replaced_labels=replaced,
        )

        disc_logits = rtd_logits(
            self.discriminator,
            input_ids=disc_input_ids.view(B, T),
            attention_mask=disc_mask,
            token_type_ids=token_type_ids,
        )  # (B, T)
        disc_loss, counts = rtd_loss(
            disc_logits.reshape(-1),
            replaced,
            attention_mask.reshape(-1).bool(),
            use_triton=self._use_triton(device),
        )
        tp, fp, fn, tn = counts.unbind()
        metrics = {
            "gen_correct": gen_correct,
            "gen_total": valid.sum(dtype=torch.int64),
            "disc_correct": tp + tn,
            "disc_total": counts.sum(),
            "replaced_tp": tp,
            "replaced_fp": fp,
            "replaced_fn": fn,
            "replaced_total": tp + fn,
        }
        loss = gen_loss.float() + self.config.disc_weight * disc_loss.float()
        return ElectraOutput(
            loss=loss,
            gen_loss=gen_loss.detach().float(),
            disc_loss=disc_loss.detach().float(),
            metrics=metrics,
        )

    def parameter_counts(self) -> dict[str, int]:
        """Unique parameters by part: shared embeddings (the discriminator's when untied), generator-only,
        discriminator-only, and the discriminator as released (its own parameters + the shared embeddings),
        the figure papers quote."""
        shared = {id(p) for p in self.shared_embeddings.parameters()}
        gen = {id(p): p.numel() for p in self.generator.parameters() if id(p) not in shared}
        disc = {id(p): p.numel() for p in self.discriminator.parameters() if id(p) not in shared}
        shared_n = sum(p.numel() for p in self.shared_embeddings.parameters())
        return {
            "total": sum(p.numel() for p in self.parameters()),
            "shared_embeddings": shared_n,
            "generator_only": sum(gen.values()),
            "discriminator_only": sum(disc.values()),
            "discriminator": sum(disc.values()) + shared_n,
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward = 3 x forward) per input token, generator + discriminator.

        Per network with L layers, hidden H, FFN F, embedding E (Kaplan et al. 2020 style, 2 FLOPs per MAC):
          forward = 2 * [L * (4 H^2 + 2 H F) + E H (projection, if E != H)]   dense matmuls
                  + 2 * 2 * L * T * H                                         attention scores and values
        The generator adds its MLM head (H E + E V) only on the masked fraction of tokens,
        min(mask_prob, max_predictions / T); the discriminator adds its RTD head (electra: H^2 + H;
        linear: 2 H).
        Embedding lookups, LayerNorm and softmax are ignored. ALBERT counts every layer application.
        """
        mask_fraction = min(self.config.mask_prob, self.config.max_predictions_for(seq_len) / seq_len)
        total = 0.0
        for network, head in (
            (
                self.generator,
                lambda c: (
                    mask_fraction
                    * (c.hidden_size * embedding_size_of(c) + embedding_size_of(c) * c.vocab_size)
                ),
            ),
            (
                self.discriminator,
                lambda c: c.hidden_size * (c.hidden_size + 1 if c.num_labels == 1 else 2),
            ),
        ):
            c = network.config
            H, F, L, E = c.hidden_size, c.intermediate_size, c.num_hidden_layers, embedding_size_of(c)
            dense = L * (4 * H * H + 2 * H * F) + (E * H if E != H else 0) + head(c)
            total += 2 * dense + 4 * L * seq_len * H
        return 3.0 * total
