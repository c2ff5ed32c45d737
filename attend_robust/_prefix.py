"""Prefix reuse: start a forward pass at a given transformer block from recorded hidden states.

A perturbation confined to layers `l` and above leaves every block below `l` computing exactly
what it computed on the clean input. The clean pass records each block's output. A later pass
skips the blocks below `l`, which return the recorded output of block `l - 1` instead of
computing it, so only blocks `l` and above run. Embeddings, mask construction and the head still
run, because they are cheap and some architectures (DeBERTa's relative positions, DeBERTa v2's
convolution after the first block) feed them to later blocks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ._state import active_plan


@dataclass
class PrefixReuse:
    """Skip blocks `0 .. start_block - 1`; block `start_block` receives `block_output`.

    `block_output` is what block `start_block - 1` returned on the clean input, arranged for the
    sequences of this pass (see `select_rows`). The caller guarantees that no mask or gate of this
    pass touches a layer below `start_block`.
    """

    start_block: int
    block_output: Any


def find_blocks(model: nn.Module, num_blocks: int) -> list[nn.Module] | None:
    """Return the distinct modules that run the model's transformer blocks, in call order.

    The blocks are the first `nn.ModuleList` of `num_blocks` modules (`encoder.layer`,
    `transformer.layer`, `h`, `layers`, ...), or ALBERT's layer groups, each of which runs several
    consecutive blocks with shared weights. Returns `None` when no such list exists.
    """
    for name, module in model.named_modules():
        if name.endswith("albert_layer_groups"):
            return list(module)  # each group runs several consecutive blocks
        if isinstance(module, nn.ModuleList) and len(module) == num_blocks:
            return list(module)
    return None


def _detach(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(_detach(item) for item in output)
    return output


def select_rows(output: Any, rows: torch.Tensor, num_sequences: int) -> Any:
    """Index every tensor in a recorded block output whose first dimension is `num_sequences`."""
    if isinstance(output, torch.Tensor):
        return output.index_select(0, rows.to(output.device)) if output.shape[:1] == (num_sequences,) else output
    if isinstance(output, tuple):
        return tuple(select_rows(item, rows, num_sequences) for item in output)
    return output


def concatenate_rows(outputs: list[Any], num_sequences: int) -> Any:
    """Concatenate recorded block outputs of several passes along their sequence dimension.

    Tensors whose first dimension is `num_sequences` are concatenated; anything else (a tensor
    shared by every sequence, `None`) is taken from the first pass.
    """
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs) if first.shape[:1] == (num_sequences,) else first
    if isinstance(first, tuple):
        return tuple(concatenate_rows([output[index] for output in outputs], num_sequences) for index in range(len(first)))
    return first


def _block_forward(original: Callable, *args: Any, **kwargs: Any) -> Any:
    plan = active_plan()
    if plan is None:
        return original(*args, **kwargs)
    index = plan.block_calls
    plan.block_calls += 1
    if plan.prefix is not None and index < plan.prefix.start_block:
        plan.calls += plan.attention_layers_per_block  # the skipped block's attention layers
        return plan.prefix.block_output
    output = original(*args, **kwargs)
    plan.blocks_computed += 1
    if plan.recorded_blocks is not None:
        plan.recorded_blocks[index] = _detach(output)
    return output


def install_block_wrappers(blocks: list[nn.Module]) -> None:
    for block in blocks:
        if "forward" not in vars(block):
            block.forward = functools.partial(_block_forward, block.forward)


def remove_block_wrappers(blocks: list[nn.Module]) -> None:
    for block in blocks:
        if "forward" in vars(block):
            del block.forward
