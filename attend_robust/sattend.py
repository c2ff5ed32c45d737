"""S-Attend: smooth self-attention by masking it at random during training.

S-Attend comes from Section 7 of "Unveiling Vulnerability of Self-Attention" (LREC-COLING 2024).
`SAttendTrainer` is a `transformers.Trainer` that masks attention at random in its training forward
passes and nowhere else, so evaluation, prediction and saved checkpoints are those of the plain model.
Two granularities are offered:

* `"unit"` (the default, as the paper describes the method): in every masked layer, each attention
  unit (one head's query-key cell) of a non-padding query and a non-padding key is masked with
  probability alpha, independently per example, layer and head. The key column of the first token
  (`[CLS]` or `<s>`) is never masked, so every query keeps at least one key.
* `"token"` (as the authors' public code does it): each non-padding, non-special token is removed
  as a key with probability alpha, once per example, and the removal is shared by every masked layer
  and head. The first token and the special tokens (`[CLS]`, `[SEP]`, `<s>`, ...) are never removed.

Shape letters: N sequences the encoder processes (batch, or batch x choices), H heads, S sequence length.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.utils import logging

from ._state import ForwardPlan, activate
from ._version import __version__
from .masked_model import AttentionMaskedModel, activation_checkpointing_enabled, checkpointing_disable_method

logger = logging.get_logger(__name__)

Granularity = Literal["unit", "token"]
GRANULARITIES: tuple[str, ...] = ("unit", "token")

# Key of the S-Attend settings in a saved model's config.json.
CONFIG_KEY = "sattend"
# Dataset column that marks special tokens (1 = special), as tokenizers return it with
# `return_special_tokens_mask=True`. It is kept through Trainer's column filtering.
SPECIAL_TOKENS_MASK_COLUMN = "special_tokens_mask"


@dataclass
class SAttendTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the settings of S-Attend; every other field is Trainer's.

    Example:

    ```python
    >>> args = SAttendTrainingArguments(output_dir="out", sattend_alpha=0.2, sattend_granularity="token")
    >>> trainer = SAttendTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    ```

    From the command line, `HfArgumentParser(SAttendTrainingArguments)` accepts `--sattend_alpha 0.2
    --sattend_granularity token --sattend_layers 0 1 2`.
    """

    sattend_alpha: float = field(
        default=0.0,
        metadata={
            "help": "S-Attend masking probability in [0, 1): the chance that one attention unit (granularity "
            "'unit') or one token (granularity 'token') is masked in a training forward pass. 0 trains "
            "exactly as Trainer does."
        },
    )
    sattend_granularity: Granularity = field(
        default="unit",
        metadata={
            "help": "What S-Attend masks: 'unit' masks single query-key cells of every head independently; "
            "'token' removes whole non-special tokens as keys, shared by every layer and head."
        },
    )
    sattend_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Indices (from 0) of the attention layers S-Attend masks. Default: every layer."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sattend_alpha, bool) or not isinstance(self.sattend_alpha, (int, float)):
            raise TypeError(f"sattend_alpha must be a number in [0, 1), got {self.sattend_alpha!r}.")
        if not 0.0 <= self.sattend_alpha < 1.0:
            raise ValueError(
                f"sattend_alpha must be in [0, 1), got {self.sattend_alpha!r}. It is the probability of masking "
                "one attention unit or token; use 0 to train without S-Attend."
            )
        self.sattend_alpha = float(self.sattend_alpha)
        if self.sattend_granularity not in GRANULARITIES:
            raise ValueError(
                f"sattend_granularity must be one of {', '.join(map(repr, GRANULARITIES))}, "
                f"got {self.sattend_granularity!r}."
            )
        if self.sattend_layers is not None:
            if self.sattend_alpha == 0.0:
                warnings.warn("sattend_layers is ignored because sattend_alpha is 0.", UserWarning, stacklevel=2)
            layers = list(self.sattend_layers)
            if not layers:
                raise ValueError("sattend_layers is empty; pass None to mask every layer.")
            invalid = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0]
            if invalid:
                raise ValueError(f"sattend_layers must contain layer indices >= 0, got invalid entries {invalid}.")
            if len(set(layers)) != len(layers):
                raise ValueError(f"sattend_layers contains duplicates: {layers}.")
            self.sattend_layers = sorted(layers)

    def sattend_settings(self) -> dict[str, Any]:
        """Return the S-Attend settings as the JSON-serialisable dict stored in config.json and the model card."""
        return {
            "alpha": self.sattend_alpha,
            "granularity": self.sattend_granularity,
            "layers": None if self.sattend_layers is None else list(self.sattend_layers),
            "seed": self.seed,
            "library": "attend-robust",
            "library_version": __version__,
        }


def mask_seed(seed: int, process_index: int, global_step: int, micro_step: int) -> int:
    """Derive the seed of one forward pass's masks from the run seed and the pass's position in training.

    `micro_step` counts the forward passes of one optimizer step (0 to gradient_accumulation_steps - 1).
    numpy's `SeedSequence` mixes the four numbers, so neighbouring steps and processes get unrelated streams.
    """
    entropy = [seed % 2**64, process_index, global_step, micro_step]
    low, high = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(high) << 31) | (int(low) >> 1)  # 63 bits, valid for torch.Generator.manual_seed


class RandomAttentionMask:
    """A unit-mask source (see `AttentionMaskedModel`) that draws S-Attend's random keep-masks.

    Masks are drawn from `generator` when a layer requests its mask, in layer order, so no `[N, L, H,
    S, S]` tensor is built. Unit granularity draws a fresh `[N, H, S, S]` mask for every masked layer.
    Token granularity draws one `[N, S]` token choice at construction and returns it to every masked layer.

    Args:
        alpha (`float`): masking probability in (0, 1).
        granularity (`str`): `"unit"` or `"token"`.
        attention_mask (`torch.Tensor`): `[N, S]` bool, True for real tokens and False for padding.
        protected (`torch.Tensor`): `[N, S]` bool, True for tokens whose key is never masked (unit
            granularity) or never removed (token granularity).
        num_heads (`int`): heads per layer.
        generator (`torch.Generator`): source of randomness, on the device of `attention_mask`.
        layers (`set[int]`, *optional*): the layers to mask. Default: every layer.
    """

    def __init__(
        self,
        alpha: float,
        granularity: str,
        attention_mask: torch.Tensor,
        protected: torch.Tensor,
        num_heads: int,
        generator: torch.Generator,
        layers: set[int] | None = None,
    ) -> None:
        self.alpha = alpha
        self.granularity = granularity
        self.num_heads = num_heads
        self.generator = generator
        self.layers = layers
        num_sequences, seq_len = attention_mask.shape
        self._shape = (num_sequences, num_heads, seq_len, seq_len)
        self._device = attention_mask.device

        if granularity == "token":
            removable = attention_mask & ~protected  # [N, S]
            draws = torch.rand(attention_mask.shape, generator=generator, device=self._device)
            self.removed_tokens = (draws < alpha) & removable  # [N, S]
            self._token_keep = ~self.removed_tokens[:, None, None, :]  # [N, 1, 1, S]
        elif granularity == "unit":
            # Units that must stay: padding queries or keys, and protected keys. [N, 1, S, S]
            candidate_keys = attention_mask & ~protected
            self._always_keep = ~(attention_mask[:, None, :, None] & candidate_keys[:, None, None, :])
        else:
            raise ValueError(f"granularity must be one of {', '.join(map(repr, GRANULARITIES))}, got {granularity!r}.")

    def layer_keep(self, layer: int) -> torch.Tensor | None:
        """Return the keep-mask of `layer` (True = attend), or None when the layer is not masked."""
        if self.layers is not None and layer not in self.layers:
            return None
        if self.granularity == "token":
            return self._token_keep
        draws = torch.rand(self._shape, generator=self.generator, device=self._device)  # [N, H, S, S]
        return (draws >= self.alpha) | self._always_keep


def base_pretrained_model(model: nn.Module) -> PreTrainedModel:
    """Return the transformers model inside `model`, which may be a PEFT model or a `torch.compile` wrapper."""
    candidate = getattr(model, "_orig_mod", model)
    if hasattr(candidate, "get_base_model"):  # a PEFT PeftModel
        candidate = candidate.get_base_model()
    if not isinstance(candidate, PreTrainedModel):
        raise TypeError(
            f"SAttendTrainer masks the attention of a transformers PreTrainedModel, got {type(model).__name__}. "
            "Pass a model loaded with an AutoModelFor... class, or a PEFT model built on one."
        )
    return candidate


class SAttendTrainer(Trainer):
    """A `transformers.Trainer` that masks self-attention at random during training (S-Attend).

    It takes exactly `Trainer`'s arguments; `args` must be a `SAttendTrainingArguments`. With
    `args.sattend_alpha == 0` it behaves exactly as `Trainer`. With alpha > 0, each training forward
    pass (`compute_loss` called from `training_step` with the model in train mode) runs with random
    attention masks; evaluation, prediction and saving run the plain model. The model is unchanged
    between training steps: the package's attention function is installed only for the length of a
    masked forward pass.

    Details:

    * Masks depend only on (`args.seed`, process rank, global step, forward pass within the step),
      so a run resumed from a checkpoint draws the masks of the uninterrupted run, and the processes
      of a distributed run draw different masks. Masks use their own `torch.Generator` and leave the
      global random state, hence dropout and data order, untouched.
    * Padding is never masked, and neither is the key column of the first token (unit granularity)
      or any special token (token granularity). Special tokens are taken from a
      `special_tokens_mask` column when the dataset has one (it survives `remove_unused_columns`),
      otherwise from the ids in `processing_class.all_special_ids` except the unknown token, otherwise
      from the special-token ids in the model's config.
    * The S-Attend settings are stored under `"sattend"` in the model's config, so every saved
      checkpoint records them, and in the model card written by `create_model_card` and `push_to_hub`.
      `push_to_hub(hackattend_report=...)` also puts a HackAttend report's results into the card.
    * A PEFT model is masked through its base model. Activation checkpointing, `torch_compile` and
      `torch.nn.DataParallel` (several GPUs in one process) are rejected with alpha > 0; use
      `accelerate launch` for several devices.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, SAttendTrainingArguments):
            raise TypeError(
                f"SAttendTrainer needs SAttendTrainingArguments, got {type(self.args).__name__}. Build the "
                "arguments with attend_robust.sattend.SAttendTrainingArguments(..., sattend_alpha=...)."
            )
        self._in_training_step = False
        self._last_global_step: int | None = None
        self._micro_step = 0
        self._masked_model: AttentionMaskedModel | None = None
        self._protected_ids: torch.Tensor | None = None
        if self.sattend_enabled:
            self._prepare_masking()

    __init__.__signature__ = inspect.signature(Trainer.__init__)  # type: ignore[attr-defined]

    @property
    def sattend_enabled(self) -> bool:
        """Whether training forward passes are masked (`args.sattend_alpha > 0`)."""
        return self.args.sattend_alpha > 0

    @property
    def sattend_settings(self) -> dict[str, Any] | None:
        """The S-Attend settings recorded in the config and the model card, or None when alpha is 0."""
        return self.args.sattend_settings() if self.sattend_enabled else None

    # ------------------------------------------------------------------ setup

    def _prepare_masking(self) -> None:
        if self.args.n_gpu > 1:
            raise NotImplementedError(
                f"S-Attend does not support torch.nn.DataParallel over {self.args.n_gpu} GPUs, because its "
                "replicas run in threads that do not see the masks. Start one process per GPU with "
                "`accelerate launch` or `torchrun` instead."
            )
        # transformers 5.25 renamed gradient_checkpointing to activation_checkpointing; both are read here.
        if getattr(self.args, "activation_checkpointing", None) or getattr(self.args, "gradient_checkpointing", None):
            raise ValueError(
                "S-Attend cannot be combined with activation (gradient) checkpointing: the backward pass would "
                "recompute attention without the masks of the forward pass. Set activation_checkpointing=False."
            )
        if self.args.torch_compile:
            raise ValueError(
                "S-Attend cannot be combined with torch_compile: the compiled graph would not see the attention "
                "function that applies the masks. Set torch_compile=False."
            )
        base_model = base_pretrained_model(self.model)
        num_layers = self._wrap(base_model).num_layers
        if self.args.sattend_layers is not None and max(self.args.sattend_layers) >= num_layers:
            raise ValueError(
                f"sattend_layers {self.args.sattend_layers} names a layer that {type(base_model).__name__} does "
                f"not have: it has {num_layers} attention layers, numbered 0 to {num_layers - 1}."
            )
        self._protected_ids = self._special_token_ids(base_model)
        if self._protected_ids is None and self.args.sattend_granularity == "token":
            logger.warning(
                "S-Attend could not find the special-token ids: pass the tokenizer as processing_class or add a "
                "'special_tokens_mask' column to the dataset. Until then only the first token and padding are "
                "protected from token-level masking."
            )

    def _wrap(self, base_model: PreTrainedModel) -> AttentionMaskedModel:
        """Return the `AttentionMaskedModel` of `base_model`, built again when Trainer replaced the model."""
        if self._masked_model is None or self._masked_model.model is not base_model:
            # `Trainer.train` replaces the model when `model_init` is given.
            self._masked_model = AttentionMaskedModel(base_model)
            self._masked_model.unwrap()  # installed again for each masked forward pass only
            if self.sattend_enabled:
                setattr(base_model.config, CONFIG_KEY, self.sattend_settings)
        return self._masked_model

    def _special_token_ids(self, model: PreTrainedModel) -> torch.Tensor | None:
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)  # a processor's tokenizer
        ids: set[int] = set()
        if tokenizer is not None and getattr(tokenizer, "all_special_ids", None):
            unknown = getattr(tokenizer, "unk_token_id", None)
            ids = {int(i) for i in tokenizer.all_special_ids if i is not None and i != unknown}
        else:
            for name in ("cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
                value = getattr(model.config, name, None)
                if isinstance(value, int):
                    ids.add(value)
        return torch.tensor(sorted(ids), dtype=torch.long) if ids else None

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if SPECIAL_TOKENS_MASK_COLUMN not in self._signature_columns:
            self._signature_columns.append(SPECIAL_TOKENS_MASK_COLUMN)

    # ------------------------------------------------------------------ masked training forward

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        self._in_training_step = True
        try:
            return super().training_step(model, inputs, num_items_in_batch=num_items_in_batch)
        finally:
            self._in_training_step = False

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Compute the loss as `Trainer` does, with random attention masks in training forward passes."""
        inputs = dict(inputs)
        special_tokens_mask = inputs.pop(SPECIAL_TOKENS_MASK_COLUMN, None)
        if not (self.sattend_enabled and self._in_training_step and model.training):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

        masked_model = self._wrap(base_pretrained_model(self.model))
        if activation_checkpointing_enabled(masked_model.model):
            raise ValueError(
                "Activation (gradient) checkpointing was enabled on the model after SAttendTrainer was built; "
                f"S-Attend cannot be combined with it. Call model.{checkpointing_disable_method(masked_model.model)}()."
            )
        masks = self.draw_masks(inputs, special_tokens_mask, *self._next_forward_position())
        plan = ForwardPlan(num_layers=masked_model.num_layers, unit_mask=masks)
        with masked_model, activate(plan):
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if plan.calls != plan.num_layers:
            raise RuntimeError(
                f"S-Attend expected {plan.num_layers} attention calls in one forward pass, but saw {plan.calls}, "
                f"so the masks did not reach every layer of {type(masked_model.model).__name__}."
            )
        return result

    def _next_forward_position(self) -> tuple[int, int]:
        """Return (global step, forward pass within that step) for the forward pass that starts now."""
        global_step = self.state.global_step
        if global_step != self._last_global_step:
            self._last_global_step = global_step
            self._micro_step = 0
        micro_step = self._micro_step
        self._micro_step += 1
        return global_step, micro_step

    def draw_masks(
        self,
        inputs: Mapping[str, Any],
        special_tokens_mask: torch.Tensor | None,
        global_step: int,
        micro_step: int,
    ) -> RandomAttentionMask:
        """Draw the random masks of one training forward pass of `inputs`.

        The masks depend only on `args.seed`, `args.process_index`, `global_step` and `micro_step`
        (the forward pass within the optimizer step) besides the inputs themselves.
        """
        if self._masked_model is None:
            raise RuntimeError("S-Attend is disabled (sattend_alpha is 0), so there are no masks to draw.")
        leading, seq_len = AttentionMaskedModel.input_shape(inputs)
        input_ids = inputs.get("input_ids")
        device = (input_ids if input_ids is not None else inputs["inputs_embeds"]).device

        # Real tokens and protected tokens, flattened to [N, S].
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            real = torch.ones(*leading, seq_len, dtype=torch.bool, device=device)
        else:
            real = attention_mask.to(device=device).bool()
        real = real.reshape(-1, seq_len)
        if self.args.sattend_granularity == "unit":
            protected = torch.zeros_like(real)
        elif special_tokens_mask is not None:
            protected = special_tokens_mask.to(device=device).bool().reshape(-1, seq_len)
        elif input_ids is not None and self._protected_ids is not None:
            protected = torch.isin(input_ids.reshape(-1, seq_len), self._protected_ids.to(device))
        else:
            protected = torch.zeros_like(real)
        # The first real token of each sequence (position 0 with right padding).
        first_token = real.long().argmax(dim=-1)  # [N]
        protected = protected.clone()
        protected[torch.arange(real.shape[0], device=device), first_token] = True

        generator = torch.Generator(device=device)
        generator.manual_seed(mask_seed(self.args.seed, self.args.process_index, global_step, micro_step))
        layers = None if self.args.sattend_layers is None else set(self.args.sattend_layers)
        return RandomAttentionMask(
            alpha=self.args.sattend_alpha,
            granularity=self.args.sattend_granularity,
            attention_mask=real,
            protected=protected,
            num_heads=self._masked_model.num_heads,
            generator=generator,
            layers=layers,
        )

    # ------------------------------------------------------------------ evaluation, cards

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        # The model's forward does not accept the special-tokens column that training keeps.
        inputs = {key: value for key, value in inputs.items() if key != SPECIAL_TOKENS_MASK_COLUMN}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def create_model_card(self, *args: Any, hackattend_report: Any = None, **kwargs: Any) -> None:
        """Write Trainer's model card, then add the S-Attend settings and, if given, HackAttend results.

        Args:
            hackattend_report (`str`, `Path` or `dict`, *optional*): a HackAttend `report.json` (or its
                contents) measured on this checkpoint; its results go into the card's `model-index`.
            *args: passed to `Trainer.create_model_card`.
            **kwargs: passed to `Trainer.create_model_card`.
        """
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        if self.sattend_settings is None and hackattend_report is None:
            return
        from .hub import hub_model_id, update_model_card

        base_model = base_pretrained_model(self.model)
        update_model_card(
            self.args.output_dir,
            sattend=self.sattend_settings,
            hackattend_report=hackattend_report,
            task_type=_task_type(base_model),
            base_model=hub_model_id(getattr(base_model.config, "_name_or_path", None)),
        )


def _task_type(model: PreTrainedModel) -> str:
    return "multiple-choice" if "MultipleChoice" in type(model).__name__ else "text-classification"
