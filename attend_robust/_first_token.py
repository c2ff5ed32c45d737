"""First-token passes: run the token-wise end of the last attention layer for the first position only.

The sequence-classification and multiple-choice heads of the supported families read one position
of the encoder's output, the first (`[CLS]`, `<s>`). In the last transformer block, everything
after the attention output (residual, layer norm, feed-forward) works on each position alone, so
the other positions of that block change nothing the head reads. A forward hook on the module
that ends the block's token mixing keeps only the first position once the model's last attention
layer has run. The feed-forward of the last block then costs one position instead of S.

The module that ends the token mixing depends on the family (`adapters.TOKEN_MIXING_OUTPUTS`).
Whether the head reads the first position only depends on the model class
(`adapters.first_token_modules`).
"""

from __future__ import annotations

import torch
from torch import nn

from ._state import active_plan


def _keep_first_position(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    plan = active_plan()
    if plan is None or not plan.first_token_only or plan.calls != plan.num_layers:
        return None  # not a first-token pass, or not the last attention layer yet
    return output[:, :1]  # every module in TOKEN_MIXING_OUTPUTS returns a [N, S, hidden] tensor


def install_first_token_hooks(modules: list[nn.Module]) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook every module of `modules`; the hooks act only in a plan with `first_token_only` set."""
    return [module.register_forward_hook(_keep_first_position) for module in modules]
