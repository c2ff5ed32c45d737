"""`AttentionMaskedModel`: unit-level attention masks, head gates and attention saliency."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Literal, Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from ._first_token import install_first_token_hooks
from ._prefix import PrefixReuse, find_blocks, install_block_wrappers, remove_block_wrappers
from ._state import DenseUnitMask, ForwardPlan, SaliencyCapture, UnitMaskSource, activate
from .adapters import ArchitectureAdapter, adapter_for, first_token_modules

SaliencyMethod = Literal["gradient", "mask-gradient", "score"]
SALIENCY_METHODS: tuple[str, ...] = ("gradient", "mask-gradient", "score")


class AttentionMaskedModel(nn.Module):
    """Wrap a transformers model so that single attention units can be masked before the softmax.

    The wrapper keeps a reference to the user's model, not a copy. Its forward takes the model's usual
    inputs plus:

    * `unit_mask`: keep-mask broadcastable to `[N, L, H, S, S]` (True or 1 = attend, False or 0 =
      masked), where N is the number of sequences the encoder sees (batch, or batch x choices for
      multiple choice), L attention layers, H heads and S the sequence length. A `[L, H, S, S]`
      mask applies to every sequence, and multiple-choice input `[B, C, S]` also accepts a
      `[B, C, L, H, S, S]` mask. A float mask with values strictly between 0 and 1 scales each
      unit's unnormalised attention weight (a continuous mask; not for DeBERTa).
    * `head_gates`: `[L, H]` or `[N, L, H]` (or `[B, C, L, H]`); a gate of 0 removes the head's
      output, as head masking in Michel et al. (2019), "Are Sixteen Heads Really Better than One?".

    Padding from `attention_mask` (and causality, for decoder models) always applies as well.
    A masked unit gets exactly zero attention probability and its row renormalises over the
    remaining keys. A row whose every non-padding key is masked gets all-zero probabilities, so
    that query's head contributes nothing (like a gated head); no NaN or inf is produced.

    While wrapped, the model's attention runs through this package (see `adapters`); `unwrap()`
    or leaving the `with` block restores it exactly.

    Example:

    ```python
    >>> wrapped = AttentionMaskedModel(model)
    >>> keep = torch.ones(wrapped.num_layers, wrapped.num_heads, 8, 8, dtype=torch.bool)
    >>> keep[5, 3, 0, 4] = False  # layer 5, head 3: query 0 may not attend to key 4
    >>> logits = wrapped(**inputs, unit_mask=keep).logits
    ```
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        model = _base_of_peft_model(model)
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"AttentionMaskedModel wraps a transformers PreTrainedModel, got {type(model).__name__}. "
                "Load the model with an AutoModel... class, or pass the base model of a PEFT model."
            )
        self.model = model
        self.adapter: ArchitectureAdapter = adapter_for(model)
        self.num_layers = self.adapter.num_attention_layers(model.config)
        self.num_heads = self.adapter.num_heads(model.config)
        # Transformer blocks, for prefix reuse; a block may hold several attention layers (ALBERT).
        self.num_blocks = int(model.config.num_hidden_layers)
        self.attention_layers_per_block = self.num_layers // self.num_blocks
        self._blocks = find_blocks(model, self.num_blocks) if self.num_layers % self.num_blocks == 0 else None
        # Modules that end each layer's token mixing, for first-token passes (None: not supported).
        self._token_mixing_outputs = first_token_modules(model)
        self._first_token_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._installed = False
        self._install()

    @property
    def supports_prefix_reuse(self) -> bool:
        """Whether a forward pass can start at a given block from recorded hidden states."""
        return self._blocks is not None

    @property
    def supports_first_token_only(self) -> bool:
        """Whether the model's head reads only the first position, so a pass may drop the others at the end."""
        return self._token_mixing_outputs is not None

    # ------------------------------------------------------------------ lifecycle

    def _install(self) -> None:
        if not self._installed:
            self.adapter.install(self.model)
            if self._blocks is not None:
                install_block_wrappers(self._blocks)
            if self._token_mixing_outputs is not None:
                self._first_token_hooks = install_first_token_hooks(self._token_mixing_outputs)
            self._installed = True

    def unwrap(self) -> PreTrainedModel:
        """Remove every change made to the model and return it."""
        if self._installed:
            self.adapter.uninstall(self.model)
            if self._blocks is not None:
                remove_block_wrappers(self._blocks)
            for handle in self._first_token_hooks:
                handle.remove()
            self._first_token_hooks = []
            self._installed = False
        return self.model

    def __enter__(self) -> "AttentionMaskedModel":
        self._install()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.unwrap()

    @contextlib.contextmanager
    def _temporarily_unwrapped(self) -> Iterator[PreTrainedModel]:
        was_installed = self._installed
        self.unwrap()
        try:
            yield self.model
        finally:
            if was_installed:
                self._install()

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save the wrapped model as a plain transformers checkpoint (no trace of the wrapper)."""
        with self._temporarily_unwrapped() as model:
            model.save_pretrained(save_directory, **kwargs)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        *args: Any,
        unit_mask: torch.Tensor | UnitMaskSource | None = None,
        head_gates: torch.Tensor | None = None,
        **inputs: Any,
    ) -> Any:
        plan = self.make_plan(inputs, unit_mask=unit_mask, head_gates=head_gates)
        return self.run_plan(plan, *args, **inputs)

    def run_plan(self, plan: ForwardPlan, *args: Any, **inputs: Any) -> Any:
        """Run the model's forward with `plan` applied to its attention."""
        if not self._installed:
            raise RuntimeError("This AttentionMaskedModel was unwrapped; wrap the model again to apply masks.")
        if self.model.training and activation_checkpointing_enabled(self.model):
            # Checkpointed layers recompute attention during backward, after the plan is gone.
            raise RuntimeError(
                "Attention masks cannot be applied while activation (gradient) checkpointing is enabled in training "
                f"mode: call `model.{checkpointing_disable_method(self.model)}()` or put the model in eval mode."
            )
        with activate(plan):
            outputs = self.model(*args, **inputs)
        if plan.calls != self.num_layers:
            raise RuntimeError(
                f"Expected {self.num_layers} attention calls in one forward pass of "
                f"{type(self.model).__name__}, but saw {plan.calls}. The model's attention does not go "
                "through the adapter this package chose for it; please report the model type."
            )
        return outputs

    def make_plan(
        self,
        inputs: Mapping[str, Any],
        unit_mask: torch.Tensor | UnitMaskSource | None = None,
        head_gates: torch.Tensor | None = None,
        capture: SaliencyCapture | None = None,
        prefix: PrefixReuse | None = None,
        record_blocks: bool = False,
        first_token_only: bool = False,
    ) -> ForwardPlan:
        """Validate `unit_mask` and `head_gates` against `inputs` and build a `ForwardPlan`.

        `record_blocks=True` keeps every block's output in `plan.recorded_blocks` after the pass;
        `prefix` skips the blocks below `prefix.start_block` (see `PrefixReuse`).
        `first_token_only=True` runs the end of the last layer for the first position only (see
        `supports_first_token_only`). The logits stay the same, but the encoder's last hidden
        state then has one position, and so do the last layer's attention weights (`[N, H, 1, S]`)
        except in DeBERTa, whose attention still runs over every position.
        """
        leading, seq_len = self.input_shape(inputs)
        num_sequences = 1
        for size in leading:
            num_sequences *= size

        source: UnitMaskSource | None
        if unit_mask is None or not isinstance(unit_mask, torch.Tensor):
            source = unit_mask
        else:
            source = DenseUnitMask(self._normalize_unit_mask(unit_mask, leading, num_sequences, seq_len))
        gates = None if head_gates is None else self._normalize_head_gates(head_gates, leading, num_sequences)
        if prefix is not None:
            self._check_prefix(prefix, source, gates)
        if first_token_only and not self.supports_first_token_only:
            raise ValueError(
                f"first_token_only=True is not supported for {type(self.model).__name__}, because its head is "
                "not known to read the first position only. Run it with first_token_only=False."
            )
        return ForwardPlan(
            num_layers=self.num_layers,
            unit_mask=source,
            head_gates=gates,
            capture=capture,
            prefix=prefix,
            recorded_blocks={} if record_blocks else None,
            attention_layers_per_block=self.attention_layers_per_block,
            first_token_only=first_token_only,
        )

    def _check_prefix(
        self, prefix: PrefixReuse, source: UnitMaskSource | None, gates: torch.Tensor | None
    ) -> None:
        if not self.supports_prefix_reuse:
            raise ValueError(
                f"{type(self.model).__name__} cannot start a forward pass mid-stack; run it without `prefix`."
            )
        if not 0 <= prefix.start_block < self.num_blocks:
            raise ValueError(f"prefix.start_block must be in [0, {self.num_blocks}), got {prefix.start_block}.")
        first_layer = prefix.start_block * self.attention_layers_per_block
        if isinstance(source, DenseUnitMask):
            masked = [layer for layer in range(first_layer) if source.layer_keep(layer) is not None]
            if masked:
                raise ValueError(f"unit_mask masks layers {masked}, below prefix.start_block {prefix.start_block}.")
        if gates is not None and bool((gates[:, :first_layer] != 1).any()):
            raise ValueError(f"head_gates gate a layer below prefix.start_block {prefix.start_block}.")

    @staticmethod
    def input_shape(inputs: Mapping[str, Any]) -> tuple[tuple[int, ...], int]:
        """Return the leading dimensions (`(B,)` or `(B, C)`) and the sequence length of `inputs`."""
        if inputs.get("input_ids") is not None:
            shape = tuple(inputs["input_ids"].shape)
        elif inputs.get("inputs_embeds") is not None:
            shape = tuple(inputs["inputs_embeds"].shape[:-1])
        else:
            raise ValueError("The inputs contain neither `input_ids` nor `inputs_embeds`.")
        if len(shape) not in (2, 3):
            raise ValueError(f"Expected input_ids of shape [B, S] or [B, C, S], got {list(shape)}.")
        return shape[:-1], shape[-1]

    def _normalize_unit_mask(
        self, mask: torch.Tensor, leading: tuple[int, ...], num_sequences: int, seq_len: int
    ) -> torch.Tensor:
        per_sequence = (self.num_layers, self.num_heads, seq_len, seq_len)
        expected = f"[N, L, H, S, S] = [{num_sequences}, {', '.join(map(str, per_sequence))}]"
        if mask.ndim == 4:
            mask = mask.unsqueeze(0)
        elif mask.ndim == 6 and len(leading) == 2:
            mask = mask.expand(*leading, *mask.shape[2:]).reshape(num_sequences, *mask.shape[2:])
        if mask.ndim != 5 or any(
            size not in (1, target) for size, target in zip(mask.shape, (num_sequences, *per_sequence))
        ):
            raise ValueError(
                f"unit_mask of shape {list(mask.shape)} is not broadcastable to {expected}. Pass [L, H, S, S] "
                "for one mask shared by all sequences, [N, L, H, S, S] for one mask per sequence, or "
                "[B, C, L, H, S, S] for multiple-choice input."
            )
        if mask.dtype != torch.bool:
            if not mask.is_floating_point():
                mask = mask != 0
            elif ((mask == 0) | (mask == 1)).all():
                mask = mask == 1
            elif (mask < 0).any() or (mask > 1).any() or not torch.isfinite(mask).all():
                raise ValueError("A float unit_mask must contain values in [0, 1] (1 = attend, 0 = masked).")
        return mask.to(self.model.device)

    def _normalize_head_gates(
        self, gates: torch.Tensor, leading: tuple[int, ...], num_sequences: int
    ) -> torch.Tensor:
        if gates.ndim == 2:
            gates = gates.unsqueeze(0)
        elif gates.ndim == 4 and len(leading) == 2:
            gates = gates.expand(*leading, *gates.shape[2:]).reshape(num_sequences, *gates.shape[2:])
        if gates.ndim != 3 or any(
            size not in (1, target)
            for size, target in zip(gates.shape, (num_sequences, self.num_layers, self.num_heads))
        ):
            raise ValueError(
                f"head_gates of shape {list(gates.shape)} is not broadcastable to [N, L, H] = "
                f"[{num_sequences}, {self.num_layers}, {self.num_heads}]. Pass [L, H] or [N, L, H]."
            )
        if not torch.isfinite(gates.float()).all():
            raise ValueError("head_gates contains NaN or inf.")
        return gates.to(self.model.device)

    # ------------------------------------------------------------------ saliency

    def attention_saliency(
        self,
        inputs: Mapping[str, Any],
        labels: torch.Tensor | None = None,
        method: SaliencyMethod = "gradient",
        *,
        unit_mask: torch.Tensor | UnitMaskSource | None = None,
        head_gates: torch.Tensor | None = None,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Score every attention unit; returns a float32 tensor of shape `[N, L, H, S, S]`.

        Args:
            inputs (`Mapping`): the model's inputs (`input_ids`, `attention_mask`, ...), without labels.
            labels (`torch.Tensor`, *optional*): targets of the loss. Default: the model's own
                predictions, so the scores explain the predicted class.
            method (`str`): one of
                - `"gradient"`: dL/dp, the gradient of the loss with respect to each attention
                  probability (one forward and one backward pass).
                - `"mask-gradient"`: dL/dM at M = 1 for a continuous keep-mask M inside the softmax,
                  `p_ij * (g_ij - sum_k p_ik g_ik)` with `g = dL/dp`. Masking unit ij changes the loss
                  by about `-dL/dM_ij`, so the most negative values are the most harmful to mask.
                - `"score"`: the attention probability itself (one forward pass, no gradient).
            unit_mask (`torch.Tensor` or `UnitMaskSource`, *optional*): keep-mask applied during the
                pass, as in `forward`.
            head_gates (`torch.Tensor`, *optional*): head gates applied during the pass, as in `forward`.
            loss_fn (`Callable`, *optional*): `loss_fn(outputs, labels) -> scalar`, summed over
                examples. Default: cross-entropy summed over examples (mean squared error for
                `num_labels == 1`), which keeps each example's scores independent of the batch.

        The loss is summed, not averaged, so an example's scores do not depend on the batch it is
        in. No gradient is left on the model's parameters and its train/eval mode is unchanged.
        """
        if method not in SALIENCY_METHODS:
            raise ValueError(f"Unknown saliency method {method!r}; choose one of {', '.join(SALIENCY_METHODS)}.")
        if "labels" in inputs:
            raise ValueError("Pass labels through the `labels` argument of attention_saliency, not in `inputs`.")

        capture = SaliencyCapture(with_probes=method != "score")
        plan = self.make_plan(inputs, unit_mask=unit_mask, head_gates=head_gates, capture=capture)
        if method == "score":
            with torch.no_grad():
                self.run_plan(plan, **inputs)
            return torch.stack([capture.probabilities[i] for i in range(self.num_layers)], dim=1).float()

        with torch.enable_grad():
            outputs = self.run_plan(plan, **inputs)
            loss = self._summed_loss(outputs, labels, loss_fn)
            probes = [capture.probes[i] for i in range(self.num_layers)]
            gradients = torch.autograd.grad(loss, probes, allow_unused=True)

        gradient = torch.stack(
            [torch.zeros_like(p) if g is None else g for p, g in zip(probes, gradients)], dim=1
        ).float()  # [N, L, H, S, S]
        if method == "gradient":
            return gradient
        probabilities = torch.stack([capture.probabilities[i] for i in range(self.num_layers)], dim=1).float()
        return probabilities * (gradient - (probabilities * gradient).sum(dim=-1, keepdim=True))

    def _summed_loss(
        self,
        outputs: Any,
        labels: torch.Tensor | None,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None,
    ) -> torch.Tensor:
        logits = getattr(outputs, "logits", None)
        if loss_fn is not None:
            return loss_fn(outputs, labels)
        if logits is None:
            raise ValueError(
                f"{type(self.model).__name__} returns no logits; pass `loss_fn(outputs, labels)` to "
                "attention_saliency to define the loss."
            )
        logits = logits.float()
        if labels is None:
            labels = logits.argmax(dim=-1) if logits.shape[-1] > 1 else logits.detach().squeeze(-1)
        labels = labels.to(logits.device)
        if logits.shape[-1] == 1 and labels.is_floating_point():
            return nn.functional.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), reduction="sum", ignore_index=-100
        )


def activation_checkpointing_enabled(model: nn.Module) -> bool:
    """Return whether any module of `model` recomputes its activations in the backward pass."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def checkpointing_disable_method(model: nn.Module) -> str:
    """Return the name of the method that turns checkpointing off, which transformers renamed during 5.x."""
    if hasattr(model, "activation_checkpointing_disable"):
        return "activation_checkpointing_disable"
    return "gradient_checkpointing_disable"


def _base_of_peft_model(model: Any) -> Any:
    """Return the transformers model inside a PEFT adapter model, with its adapter layers in place.

    Adapters that change only weights (LoRA, IA3, ...) run inside the base model's modules, so the
    base model's forward is the adapter model's forward. Prompt-learning adapters (prompt and
    prefix tuning) add inputs outside it and are rejected.
    """
    get_base_model = getattr(model, "get_base_model", None)
    peft_config = getattr(model, "peft_config", None)
    if get_base_model is None or not isinstance(peft_config, dict) or isinstance(model, PreTrainedModel):
        return model
    active = getattr(model, "active_adapter", None)
    config = peft_config.get(active) if isinstance(active, str) else None
    if config is not None and getattr(config, "is_prompt_learning", False):
        raise TypeError(
            f"{type(model).__name__} uses prompt learning ({config.peft_type}), which adds inputs outside the base "
            "model, so its attention cannot be masked as the adapter model runs it. Use a weight adapter such as LoRA."
        )
    return get_base_model()
