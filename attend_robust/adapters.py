"""Architecture adapters: how unit masks reach the attention of each model family.

The core of the package (masks, search, metrics, training hooks) only talks to
`ArchitectureAdapter`. Two adapters cover the supported families:

* `RegistryAdapter` for every model whose attention goes through the transformers
  `AttentionInterface` registry (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, ALBERT, DistilBERT, and
  decoder-only classifiers such as GPT-2 and Llama). It registers one attention function,
  `"attend_robust"`, and switches the model to it while wrapped.
* `DisentangledAttentionAdapter` for DeBERTa v1 and v2/v3, whose attention is computed inside
  `DisentangledSelfAttention`. A forward pre-hook narrows the attention mask, and a hook on the
  attention dropout post-processes the probabilities.

Adding a family means adding an adapter and one entry in `ADAPTERS_BY_MODEL_TYPE`, and, for
first-token passes, one entry in `TOKEN_MIXING_OUTPUTS`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ._state import active_plan, apply_keep_and_gates, finish_probabilities

ATTENTION_NAME = "attend_robust"


def _attend_robust_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Build the boolean `[B, 1, Q, K]` mask (True = attend) that `masked_attention_forward` expects.

    The skips that let sdpa drop the mask are disabled, so padding and causality always arrive
    as an explicit tensor.
    """
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def masked_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with unit masks, head gates and saliency probes from the active plan.

    Outside a plan it computes plain eager attention, so a model left switched to this function
    still gives its usual outputs.
    """
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError(
            "attend_robust does not support sliding-window or soft-capped attention; "
            f"the module {type(module).__name__} requested it."
        )
    # query: [N, H, Q, D]; key and value: [N, H_kv, K, D] (H_kv < H with grouped-query attention)
    num_heads = query.shape[1]
    if key.shape[1] != num_heads:
        repeats = num_heads // key.shape[1]
        key = key.repeat_interleave(repeats, dim=1)
        value = value.repeat_interleave(repeats, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5

    if attention_mask is not None and attention_mask.dtype != torch.bool:
        # An additive float mask (a caller that built it for eager): finite values are kept.
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    if attention_mask is None and getattr(module, "is_causal", False) and query.shape[2] > 1:
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril(
            key.shape[2] - query.shape[2]
        )

    plan = active_plan()
    if plan is None:
        layer, unit_keep, gates, capture = -1, None, None, None
    else:
        layer = plan.next_layer(module)
        unit_keep, gates, capture = plan.layer_keep(layer), plan.layer_gates(layer), plan.capture

    num_queries = query.shape[2]
    first_query_only = (
        plan is not None and plan.first_token_only and layer == plan.num_layers - 1 and capture is None
    )
    if first_query_only:
        # Only position 0 of the last layer reaches the head (see `_first_token`). The other rows
        # of the output stay zero, and the hook after the layer's token mixing drops them.
        query = query[:, :, :1]
        attention_mask = None if attention_mask is None else attention_mask[..., :1, :]
        unit_keep = None if unit_keep is None else unit_keep[..., :1, :]

    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # [N, H, Q, K]
    scores, emptied_rows = apply_keep_and_gates(scores, attention_mask, unit_keep)
    # Half-precision scores are normalised in float32, as Llama's eager attention does.
    softmax_dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    probabilities = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(query.dtype)
    probabilities = finish_probabilities(probabilities, emptied_rows, gates, capture, layer)
    probabilities = nn.functional.dropout(probabilities, p=dropout, training=module.training)

    output = torch.matmul(probabilities, value).transpose(1, 2).contiguous()  # [N, Q, H, D]
    if first_query_only:
        output = torch.cat([output, output.new_zeros(output.shape[0], num_queries - 1, *output.shape[2:])], dim=1)
    return output, probabilities


ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, masked_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _attend_robust_mask)


class ArchitectureAdapter:
    """Connects the unit-mask machinery to one family of models.

    Subclasses implement `install` (route attention through the active `ForwardPlan`) and
    `uninstall` (restore the model exactly), and may override `num_attention_layers` when a
    forward pass applies attention a number of times other than `config.num_hidden_layers`.
    """

    name: str = "base"

    def num_attention_layers(self, config: Any) -> int:
        return int(config.num_hidden_layers)

    def num_heads(self, config: Any) -> int:
        return int(config.num_attention_heads)

    def install(self, model: PreTrainedModel) -> None:
        raise NotImplementedError

    def uninstall(self, model: PreTrainedModel) -> None:
        raise NotImplementedError


class RegistryAdapter(ArchitectureAdapter):
    """Switches a model to the `"attend_robust"` attention function, and back."""

    name = "attention-registry"

    def __init__(self) -> None:
        self._saved: dict[int, tuple[Any, str]] = {}

    def num_attention_layers(self, config: Any) -> int:
        # ALBERT applies `inner_group_num` attention layers per hidden layer (1 in every released
        # checkpoint); other families apply one.
        return int(config.num_hidden_layers) * int(getattr(config, "inner_group_num", 1) or 1)

    def install(self, model: PreTrainedModel) -> None:
        for submodule in model.modules():
            if isinstance(submodule, PreTrainedModel) and id(submodule.config) not in self._saved:
                self._saved[id(submodule.config)] = (submodule.config, submodule.config._attn_implementation)
        model.set_attn_implementation(ATTENTION_NAME)

    def uninstall(self, model: PreTrainedModel) -> None:
        for config, implementation in self._saved.values():
            config._attn_implementation_internal = implementation
        self._saved.clear()


class DisentangledAttentionAdapter(ArchitectureAdapter):
    """Hooks DeBERTa's `DisentangledSelfAttention` modules (v1 and v2/v3).

    The pre-hook replaces the `[N, 1, S, S]` attention mask with the padding mask narrowed by the
    layer's unit mask; DeBERTa then fills masked scores with the minimum of the scores' dtype.
    The hook on the module's attention dropout receives the probabilities right after the softmax and
    zeroes emptied rows, applies head gates and attaches saliency probes. Dropout is inactive in
    eval mode, and the three operations commute with it in training mode.
    """

    name = "deberta-disentangled"

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self, model: PreTrainedModel) -> None:
        attentions = [m for m in model.modules() if type(m).__name__ == "DisentangledSelfAttention"]
        for layer, attention in enumerate(attentions):
            pending: dict[str, Any] = {}
            self._handles.append(
                attention.register_forward_pre_hook(self._make_pre_hook(layer, pending), with_kwargs=True)
            )
            self._handles.append(attention.dropout.register_forward_hook(self._make_dropout_hook(layer, pending)))

    def uninstall(self, model: PreTrainedModel) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _make_pre_hook(layer: int, pending: dict[str, Any]) -> Callable:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            pending.clear()
            plan = active_plan()
            if plan is None:
                return None
            plan.next_layer(module)
            unit_keep = plan.layer_keep(layer)
            pending["plan"] = plan
            if unit_keep is None:
                return None

            base_keep = kwargs["attention_mask"] if "attention_mask" in kwargs else args[1]
            base_keep = base_keep.bool()  # [N, 1, S, S]
            if unit_keep.dtype != torch.bool:
                raise NotImplementedError(
                    "Continuous (float) unit masks are not supported for DeBERTa; pass a boolean mask."
                )
            keep = base_keep & unit_keep
            emptied = ~keep.any(dim=-1, keepdim=True) & base_keep.any(dim=-1, keepdim=True)
            pending["emptied"] = emptied
            if "attention_mask" in kwargs:
                kwargs = {**kwargs, "attention_mask": keep}
            else:
                args = (args[0], keep, *args[2:])
            return args, kwargs

        return pre_hook

    @staticmethod
    def _make_dropout_hook(layer: int, pending: dict[str, Any]) -> Callable:
        def dropout_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            plan = pending.get("plan")
            if plan is None:
                return None
            return finish_probabilities(
                output, pending.get("emptied"), plan.layer_gates(layer), plan.capture, layer
            )

        return dropout_hook


REGISTRY_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "albert", "distilbert")
DISENTANGLED_MODEL_TYPES = ("deberta", "deberta-v2")
SUPPORTED_MODEL_TYPES = REGISTRY_MODEL_TYPES + DISENTANGLED_MODEL_TYPES

ADAPTERS_BY_MODEL_TYPE: dict[str, type[ArchitectureAdapter]] = {
    **{model_type: RegistryAdapter for model_type in REGISTRY_MODEL_TYPES},
    **{model_type: DisentangledAttentionAdapter for model_type in DISENTANGLED_MODEL_TYPES},
}


# Per family, the name of the submodule of each layer after which the layer works on each position
# alone (residual, layer norm, feed-forward). First-token passes keep one position from there on.
TOKEN_MIXING_OUTPUTS: dict[str, str] = {
    **{model_type: "attention.output" for model_type in ("bert", "roberta", "xlm-roberta", "electra")},
    "albert": "attention.LayerNorm",
    "distilbert": "sa_layer_norm",
    **{model_type: "attention.output" for model_type in DISENTANGLED_MODEL_TYPES},
}
FIRST_TOKEN_HEADS = ("ForSequenceClassification", "ForMultipleChoice")


# Packages whose modules may form a first-position head: the transformers heads themselves, torch
# layers, and PEFT's wrappers (LoRA layers, `modules_to_save` copies) around them.
_HEAD_MODULE_PACKAGES = ("transformers.", "torch.", "peft.")


def first_token_modules(model: PreTrainedModel) -> list[nn.Module] | None:
    """Return the modules that end each layer's token mixing, if the model's head reads the first position only.

    The transformers sequence-classification and multiple-choice classes of the families in
    `TOKEN_MIXING_OUTPUTS` pool or classify position 0. Returns `None`, so that every position of
    the last layer runs, for any other model and in these cases:

    - a head module (`classifier`, `pooler`, ...) replaced by a class from outside transformers,
      torch or PEFT, which may read other positions;
    - an ELECTRA multiple-choice summary other than `"first"`;
    - a feed-forward chunk size above 1 (`chunk_size_feed_forward`), which needs every position;
    - DeBERTa models changed to run the last layer more than once (`z_steps > 1`) or to convolve
      the output of their only layer.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    suffix = TOKEN_MIXING_OUTPUTS.get(model_type)
    model_class = type(model)
    if suffix is None or not model_class.__module__.startswith("transformers."):
        return None
    if not model_class.__name__.endswith(FIRST_TOKEN_HEADS):
        return None

    base = getattr(model, model.base_model_prefix, model)
    head_modules = [module for child in model.children() if child is not base for module in child.modules()]
    if any(not type(module).__module__.startswith(_HEAD_MODULE_PACKAGES) for module in head_modules):
        return None
    if model_type == "electra" and model_class.__name__.endswith("ForMultipleChoice"):
        # transformers' summary falls back to "last" when the config has no summary_type.
        if getattr(config, "summary_type", "last") != "first":
            return None
    if (getattr(config, "chunk_size_feed_forward", 0) or 0) > 1:
        return None
    if getattr(base, "z_steps", 0) > 1:
        return None
    if getattr(config, "conv_kernel_size", 0) and int(config.num_hidden_layers) == 1:
        return None

    modules = [module for name, module in model.named_modules() if name.endswith("." + suffix)]
    return modules or None


def adapter_for(model: PreTrainedModel) -> ArchitectureAdapter:
    """Return a fresh adapter for `model`, or raise `ValueError` naming the supported families."""
    model_type = getattr(model.config, "model_type", None)
    adapter_class = ADAPTERS_BY_MODEL_TYPE.get(model_type)
    if adapter_class is not None:
        return adapter_class()
    # Any other model that routes attention through the registry can be switched the same way.
    if getattr(model, "_supports_attention_backend", False) and model._can_set_attn_implementation():
        return RegistryAdapter()
    raise ValueError(
        f"Model type {model_type!r} ({type(model).__name__}) is not supported by attend_robust. "
        f"Supported: {', '.join(SUPPORTED_MODEL_TYPES)}, and any model whose attention goes through the "
        "transformers AttentionInterface registry (`_supports_attention_backend = True`)."
    )
