"""The sequential HackAttend search: one example, one full forward pass per removal and per query.

This is Algorithm 1 of Liong et al., "Unveiling Vulnerability of Self-Attention" (LREC-COLING
2024), evaluated the way a plain implementation does. Each layer removal, head removal and candidate mask is a separate forward pass of one copy of
the example through the whole model, and nothing computed for one pass is reused by another.
`HackAttendSearch` takes the same decisions with far less work. This module is the baseline that
the tests and `benchmarks/bench_hackattend_search.py` compare it with.
"""

from __future__ import annotations

import time
from typing import Mapping

import torch

from ..masked_model import AttentionMaskedModel
from .config import HackAttendConfig
from .search import (
    PhaseTimes,
    SearchResult,
    SparseUnitMask,
    candidate_units,
    class_probabilities,
    count_model_evaluations,
    derived_seed,
    rank_removals,
    record_mask,
    select_units,
    units_per_matrix,
)


class SequentialHackAttendSearch:
    """HackAttend with batch size 1 and a full recompute for every forward pass.

    `attack` returns the same `SearchResult` as `HackAttendSearch.attack`, with
    `layer_evaluations` counting every attention layer it ran (the number of layers per pass).
    """

    def __init__(self, wrapped: AttentionMaskedModel, config: HackAttendConfig) -> None:
        self.wrapped = wrapped
        self.config = config.resolve(wrapped.num_layers, wrapped.num_heads)
        self._passes = 0
        self.phases = PhaseTimes()

    @torch.no_grad()
    def _probabilities(self, inputs, unit_mask=None, head_gates=None) -> torch.Tensor:
        self._passes += 1
        logits = self.wrapped(**inputs, unit_mask=unit_mask, head_gates=head_gates).logits
        return class_probabilities(logits)[0].cpu()

    def _removal_order(self, inputs, label: int, variants: list[torch.Tensor]) -> list[int]:
        rows = [self._probabilities(inputs, head_gates=gates) for gates in variants]
        return rank_removals(torch.stack(rows), label)

    def attack(self, inputs: Mapping[str, torch.Tensor], label: int, example_key: str) -> SearchResult:
        """Search one example; arguments as in `HackAttendSearch.attack`."""
        started = time.perf_counter()
        self._passes = 0
        config, num_layers, num_heads = self.config, self.wrapped.num_layers, self.wrapped.num_heads
        inputs = {name: tensor.to(self.wrapped.device) for name, tensor in inputs.items()}
        attention_mask = inputs["attention_mask"].reshape(-1, inputs["attention_mask"].shape[-1]).bool().cpu()
        num_sequences, seq_len = attention_mask.shape

        with self.phases.measure("clean and saliency"):
            clean = self._probabilities(inputs)
        prediction = int(clean.argmax())
        result = SearchResult(
            clean_prediction=prediction, clean_confidence=float(clean[prediction]), attacked=prediction == label
        )
        if not result.attacked:
            return self._finish(result, started, layers_reached=0)

        # Layer order.
        if config.layer_ranking == "random":
            generator = torch.Generator().manual_seed(derived_seed(config.seed, example_key, "layers"))
            layer_order = torch.randperm(num_layers, generator=generator).tolist()
        else:
            variants = []
            for layer in range(num_layers):
                gates = torch.ones(num_layers, num_heads)
                gates[layer] = 0.0
                variants.append(gates)
            with self.phases.measure("layer ranking"):
                layer_order = self._removal_order(inputs, label, variants)
        result.layer_order = layer_order[: config.max_layers]

        # Unit scores, higher masked earlier.
        candidates = candidate_units(attention_mask, config.protect_first_token)
        budgets = [units_per_matrix(config.alpha, int(n)) for n in attention_mask.sum(dim=-1).tolist()]
        shape = (num_sequences, num_layers, num_heads, seq_len, seq_len)
        fallback = torch.zeros(shape[:3], dtype=torch.bool)
        labels = torch.tensor([label], device=self.wrapped.device)
        if config.unit_ranking == "random":
            generator = torch.Generator().manual_seed(derived_seed(config.seed, example_key, "units"))
            scores = torch.rand(shape, generator=generator)
        elif config.unit_ranking == "score":
            self._passes += 1
            with self.phases.measure("clean and saliency"):
                scores = self.wrapped.attention_saliency(inputs, labels, "score").cpu()
        else:
            self._passes += 1
            method = "mask-gradient" if config.unit_ranking == "mask-gradient" else "gradient"
            with self.phases.measure("clean and saliency"):
                saliency = self.wrapped.attention_saliency(inputs, labels, method).cpu()
            scores = saliency if config.unit_ranking == "gradient-largest" else -saliency
            fallback = (scores.abs() * candidates[:, None, None]).amax(dim=(-2, -1)) == 0
            if fallback.any():
                self._passes += 1
                with self.phases.measure("clean and saliency"):
                    attention = self.wrapped.attention_saliency(inputs, labels, "score").cpu()
                scores = torch.where(fallback[..., None, None], attention, scores)

        # Greedy queries, one forward each.
        masked: list[torch.Tensor] = []
        probabilities = clean
        for layer in result.layer_order:
            if config.head_ranking == "random":
                generator = torch.Generator().manual_seed(derived_seed(config.seed, example_key, f"heads-{layer}"))
                heads = torch.randperm(num_heads, generator=generator).tolist()
            else:
                variants = []
                for head in range(num_heads):
                    gates = torch.ones(num_layers, num_heads)
                    gates[layer, head] = 0.0
                    variants.append(gates)
                with self.phases.measure("head ranking"):
                    heads = self._removal_order(inputs, label, variants)
            for head in heads[: config.max_heads]:
                with self.phases.measure("queries"):
                    masked.append(select_units(scores, candidates, budgets, layer, head))
                    result.perturbed_heads.append((layer, head))
                    mask = SparseUnitMask(1, num_sequences, num_heads, seq_len, [torch.cat(masked)], self.wrapped.device)
                    probabilities = self._probabilities(inputs, unit_mask=mask)
                if int(probabilities.argmax()) != label:
                    result.success = True
                    break
            if result.success:
                break

        result.queries = len(result.perturbed_heads)
        units = torch.cat(masked) if masked else torch.zeros(0, 5, dtype=torch.long)
        record_mask(result, units, candidates, fallback)
        adversarial = int(probabilities.argmax())
        result.adversarial_prediction = adversarial
        result.adversarial_confidence = float(probabilities[adversarial])
        layers_reached = len({layer for layer, _ in result.perturbed_heads})
        return self._finish(result, started, layers_reached)

    def _finish(self, result: SearchResult, started: float, layers_reached: int) -> SearchResult:
        if result.attacked:
            result.model_evaluations = count_model_evaluations(
                self.config, self.wrapped.num_layers, self.wrapped.num_heads, layers_reached, result.queries
            )
        else:
            result.model_evaluations = 1
        result.layer_evaluations = self._passes * self.wrapped.num_layers
        result.seconds = time.perf_counter() - started
        return result
