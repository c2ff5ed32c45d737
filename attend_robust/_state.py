"""Per-forward state shared between `AttentionMaskedModel` and the attention hooks.

Shape letters used in this package:
    N  sequences the encoder processes (batch, or batch x choices for multiple choice)
    L  attention layers, H  heads per layer, S  sequence length (queries and keys)
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import torch


class UnitMaskSource(Protocol):
    """Supplies the keep-mask of one layer while the encoder runs.

    Implementations build each layer's mask only when that layer runs, so no
    `[N, L, H, S, S]` tensor has to exist. `layer_keep` returns a tensor broadcastable to
    `[N, H, S, S]` (bool, or float in `[0, 1]` for a continuous mask), or `None` when the layer
    is not masked.
    """

    def layer_keep(self, layer: int) -> torch.Tensor | None: ...


@dataclass
class DenseUnitMask:
    """A keep-mask given as one tensor broadcastable to `[N, L, H, S, S]`.

    Layers whose mask keeps every unit are reported as unmasked (`None`), so an all-keep layer
    costs no more than the unwrapped model.
    """

    keep: torch.Tensor  # [N or 1, L or 1, H or 1, S or 1, S or 1]
    _masked_layers: list[bool] | None = field(default=None, init=False, repr=False)

    def layer_keep(self, layer: int) -> torch.Tensor | None:
        if self._masked_layers is None:
            per_layer = self.keep.transpose(0, 1).reshape(self.keep.shape[1], -1)
            fully_kept = per_layer.all(dim=-1) if self.keep.dtype == torch.bool else (per_layer == 1).all(dim=-1)
            self._masked_layers = (~fully_kept).tolist()
        index = 0 if self.keep.shape[1] == 1 else layer
        return self.keep[:, index] if self._masked_layers[index] else None


@dataclass
class SaliencyCapture:
    """Holds, per layer, the attention probabilities and zero-valued probes added to them.

    The gradient of the loss with respect to a probe is dL/dp for that layer's probabilities.
    """

    with_probes: bool = True
    probes: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N, H, S, S]
    probabilities: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N, H, S, S]

    def attach(self, layer: int, probabilities: torch.Tensor) -> torch.Tensor:
        if not self.with_probes:
            self.probabilities[layer] = probabilities.detach()
            return probabilities
        probe = torch.zeros_like(probabilities, requires_grad=True)
        self.probes[layer] = probe
        self.probabilities[layer] = probabilities.detach()
        return probabilities + probe


@dataclass
class ForwardPlan:
    """Masks, gates and probes that the attention hooks apply during one forward pass."""

    num_layers: int
    unit_mask: UnitMaskSource | None = None
    head_gates: torch.Tensor | None = None  # [N or 1, L, H]
    capture: SaliencyCapture | None = None
    # Prefix reuse (see `_prefix`): blocks to skip, and where to record the clean blocks' outputs.
    prefix: Any = None
    recorded_blocks: dict[int, Any] | None = None
    attention_layers_per_block: int = 1
    # First-token pass (see `_first_token`): after the last attention layer, keep position 0 only.
    first_token_only: bool = False
    # Number of attention calls so far in this forward, for modules without a fixed layer index.
    calls: int = 0
    block_calls: int = 0
    blocks_computed: int = 0

    def next_layer(self, module: torch.nn.Module) -> int:
        """Return the layer index of the attention call that is starting now."""
        # Modules with a `layer_idx` (BERT, GPT-2, Llama, ...) use it. Modules shared by all layers
        # (ALBERT) or without an index (DistilBERT) are numbered in call order.
        layer_idx = getattr(module, "layer_idx", None)
        layer = layer_idx if isinstance(layer_idx, int) else self.calls
        self.calls += 1
        if layer >= self.num_layers:
            raise RuntimeError(
                f"Attention was called for layer {layer}, but the model has {self.num_layers} attention "
                "layers; the model's attention does not follow the layout its adapter expects."
            )
        return layer

    def layer_keep(self, layer: int) -> torch.Tensor | None:
        if self.unit_mask is None:
            return None
        return self.unit_mask.layer_keep(layer)

    def layer_gates(self, layer: int) -> torch.Tensor | None:
        if self.head_gates is None:
            return None
        return self.head_gates[:, layer]


_ACTIVE_PLAN: contextvars.ContextVar[ForwardPlan | None] = contextvars.ContextVar(
    "attend_robust_active_plan", default=None
)


def active_plan() -> ForwardPlan | None:
    return _ACTIVE_PLAN.get()


@contextlib.contextmanager
def activate(plan: ForwardPlan) -> Iterator[ForwardPlan]:
    token = _ACTIVE_PLAN.set(plan)
    try:
        yield plan
    finally:
        _ACTIVE_PLAN.reset(token)


def apply_keep_and_gates(
    scores: torch.Tensor,
    base_keep: torch.Tensor | None,
    unit_keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exclude masked units from `scores` ([N, H, S, S]) before the softmax.

    Returns the masked scores and a `[N, H, S, 1]` bool tensor that marks the rows to zero after
    the softmax: rows in which the unit mask removed every key that padding had left. Rows that
    padding alone empties keep the model's own behaviour, so an all-keep mask changes nothing.
    A float `unit_keep` in `[0, 1]` scales each unit's unnormalised weight (a continuous mask).
    """
    fill_value = torch.finfo(scores.dtype).min
    if unit_keep is None:
        if base_keep is not None:
            scores = scores.masked_fill(~base_keep, fill_value)
        return scores, None

    if unit_keep.dtype == torch.bool:
        unit_bool = unit_keep
    else:
        # log(M) added to the scores multiplies exp(score) by M; M = 0 becomes the fill value.
        unit_bool = unit_keep > 0
        scores = scores + torch.log(unit_keep.to(scores.dtype).clamp_min(torch.finfo(scores.dtype).tiny))
    keep = unit_bool if base_keep is None else unit_bool & base_keep
    scores = scores.masked_fill(~keep, fill_value)

    emptied = ~keep.any(dim=-1, keepdim=True)
    if base_keep is not None:
        emptied = emptied & base_keep.any(dim=-1, keepdim=True)
    return scores, emptied


def finish_probabilities(
    probabilities: torch.Tensor,
    emptied_rows: torch.Tensor | None,
    gates: torch.Tensor | None,
    capture: SaliencyCapture | None,
    layer: int,
) -> torch.Tensor:
    """Zero emptied rows, gate heads and attach saliency probes to `[N, H, S, S]` probabilities."""
    if emptied_rows is not None:
        probabilities = probabilities.masked_fill(emptied_rows, 0.0)
    if gates is not None:
        probabilities = probabilities * gates.to(probabilities.dtype)[..., None, None]
    if capture is not None:
        probabilities = capture.attach(layer, probabilities)
    return probabilities
