"""The HackAttend greedy search over attention units for one example.

Shape letters, as in `attend_robust._state`: N sequences of the example (1, or the number of
choices C for multiple choice), L attention layers, H heads, S sequence length, Q candidate masks
evaluated in one forward pass. A unit is `(sequence, layer, head, query, key)`.

The search, for an example the model predicts correctly:

1. Rank the layers. `importance` removes all heads of one layer (head gates at 0), for each layer
   in batched forwards. Layers whose removal flips the prediction come first. The rest follow by
   the remaining probability of the label, lowest first, and ties keep the lower index first.
2. Score every unit once on the clean input (see `HackAttendConfig.unit_ranking`). With
   `gradient`, the units whose cross-entropy gradient dL/dp is most negative come first, because
   masking lowers their probability and so raises the loss. On the MiniLM SST-2 victim of
   `docs/results.md`, largest-first (`gradient-largest`) flipped none of 206 predictions.
3. For each of the top `max_layers` layers, rank its heads the same way, one head removed at a
   time on the clean input. Then, for each of its top `max_heads` heads, add that head's top-k
   candidate units of every sequence to the accumulated mask and query the model with the whole
   mask. Stop at the first query whose prediction differs from the label.

Every candidate mask is fixed once the rankings are known, so queries are evaluated in batches and
the first success in greedy order is taken. The batch size changes speed, never a decision.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..masked_model import AttentionMaskedModel
from .config import HackAttendConfig

# A masked unit: (sequence, layer, head, query position, key position).
Unit = tuple[int, int, int, int, int]

# Added before flooring alpha * n * n so that products such as 0.29 * 100 = 28.999999999999996
# give the budget the decimal arithmetic intends.
_BUDGET_EPSILON = 1e-9


def units_per_matrix(alpha: float, num_tokens: int) -> int:
    """Return k = max(1, floor(alpha * n * n)), the units masked in one perturbed matrix of n tokens."""
    return max(1, math.floor(alpha * num_tokens * num_tokens + _BUDGET_EPSILON))


def derived_seed(seed: int, example_key: str, purpose: str) -> int:
    """Return a 63-bit seed for one example and one random choice, stable across processes and runs."""
    digest = hashlib.sha256(f"{seed}\x00{example_key}\x00{purpose}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class SearchResult:
    """Outcome of the search on one example."""

    clean_prediction: int
    clean_confidence: float
    attacked: bool  # False when the clean prediction was already wrong
    success: bool = False
    queries: int = 0  # forwards with a perturbed mask, up to the first success or all of them
    model_evaluations: int = 0  # queries plus clean, saliency and ranking forwards (see `_count_evaluations`)
    perturbed_heads: list[tuple[int, int]] = field(default_factory=list)  # (layer, head) in greedy order
    masked_units: list[Unit] = field(default_factory=list)
    num_perturbed_matrices: int = 0
    candidate_units: int = 0  # candidate units of the perturbed matrices
    ranking_fallbacks: int = 0  # perturbed matrices ranked by attention score because their gradient was zero
    adversarial_prediction: int | None = None
    adversarial_confidence: float | None = None  # probability of `adversarial_prediction` under the last query
    layer_order: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def hamming(self) -> float:
        """Mean number of masked units per perturbed attention matrix (0 when nothing was perturbed)."""
        if self.num_perturbed_matrices == 0:
            return 0.0
        return len(self.masked_units) / self.num_perturbed_matrices


class SparseUnitMask:
    """Keep-masks of Q candidate queries, built one layer at a time from lists of masked units.

    Implements the `UnitMaskSource` protocol of `AttentionMaskedModel`: `layer_keep` returns a
    `[Q * N, H, S, S]` bool tensor (row `q * N + sequence`) only for layers that have masked units.
    """

    def __init__(
        self,
        num_queries: int,
        num_sequences: int,
        num_heads: int,
        seq_len: int,
        units_per_query: list[torch.Tensor],
        device: torch.device | str = "cpu",
    ) -> None:
        # units_per_query[q]: [m, 5] long tensor of (sequence, layer, head, query, key)
        self.shape = (num_queries * num_sequences, num_heads, seq_len, seq_len)
        self.device = device
        rows: list[torch.Tensor] = []
        for query_index, units in enumerate(units_per_query):
            if units.numel() == 0:
                continue
            row = units[:, 0] + query_index * num_sequences
            rows.append(torch.cat([row[:, None], units[:, 1:]], dim=1))
        self._by_layer: dict[int, torch.Tensor] = {}
        if rows:
            everything = torch.cat(rows)  # [M, 5]: row, layer, head, query, key
            for layer in torch.unique(everything[:, 1]).tolist():
                self._by_layer[layer] = everything[everything[:, 1] == layer]

    def layer_keep(self, layer: int) -> torch.Tensor | None:
        units = self._by_layer.get(layer)
        if units is None:
            return None
        keep = torch.ones(self.shape, dtype=torch.bool, device=self.device)
        keep[units[:, 0], units[:, 2], units[:, 3], units[:, 4]] = False
        return keep


def repeat_inputs(inputs: Mapping[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """Repeat one example's tensors (leading dimension 1) `times` times along the batch dimension."""
    return {name: tensor.repeat(times, *([1] * (tensor.ndim - 1))) for name, tensor in inputs.items()}


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Return `[B, num_classes]` probabilities from classification `[B, K]` or multiple-choice `[B, C]` logits."""
    return torch.softmax(logits.float(), dim=-1)


class HackAttendSearch:
    """Runs the greedy HackAttend search on single examples with an `AttentionMaskedModel`."""

    def __init__(self, wrapped: AttentionMaskedModel, config: HackAttendConfig) -> None:
        self.wrapped = wrapped
        self.config = config.resolve(wrapped.num_layers, wrapped.num_heads)

    # ------------------------------------------------------------------ forwards

    @torch.no_grad()
    def _probabilities(
        self,
        inputs: Mapping[str, torch.Tensor],
        times: int,
        unit_mask: SparseUnitMask | None = None,
        head_gates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return `[times, num_classes]` class probabilities of `times` perturbed copies of one example."""
        batch = repeat_inputs(inputs, times)
        logits = self.wrapped(**batch, unit_mask=unit_mask, head_gates=head_gates).logits
        return class_probabilities(logits)

    def _removal_order(
        self, inputs: Mapping[str, torch.Tensor], label: int, gates: torch.Tensor, num_sequences: int
    ) -> list[int]:
        """Order removal variants (`gates`: [V, L, H]) by how much they hurt the label, worst first."""
        num_variants = gates.shape[0]
        remaining: list[float] = []
        flipped: list[bool] = []
        for start in range(0, num_variants, self.config.ranking_batch_size):
            chunk = gates[start : start + self.config.ranking_batch_size]
            # Each variant's gates apply to every sequence (choice) of its copy of the example.
            per_sequence = chunk.repeat_interleave(num_sequences, dim=0)  # [V * N, L, H]
            probabilities = self._probabilities(inputs, chunk.shape[0], head_gates=per_sequence)
            remaining.extend(probabilities[:, label].tolist())
            flipped.extend((probabilities.argmax(dim=-1) != label).tolist())
        return sorted(range(num_variants), key=lambda index: (not flipped[index], remaining[index], index))

    def rank_layers(
        self, inputs: Mapping[str, torch.Tensor], label: int, example_key: str, num_sequences: int
    ) -> list[int]:
        num_layers, num_heads = self.wrapped.num_layers, self.wrapped.num_heads
        if self.config.layer_ranking == "random":
            generator = torch.Generator().manual_seed(derived_seed(self.config.seed, example_key, "layers"))
            return torch.randperm(num_layers, generator=generator).tolist()
        gates = torch.ones(num_layers, num_layers, num_heads)
        for layer in range(num_layers):
            gates[layer, layer, :] = 0.0
        return self._removal_order(inputs, label, gates, num_sequences)

    def rank_heads(
        self, inputs: Mapping[str, torch.Tensor], label: int, example_key: str, num_sequences: int, layer: int
    ) -> list[int]:
        num_layers, num_heads = self.wrapped.num_layers, self.wrapped.num_heads
        if self.config.head_ranking == "random":
            generator = torch.Generator().manual_seed(derived_seed(self.config.seed, example_key, f"heads-{layer}"))
            return torch.randperm(num_heads, generator=generator).tolist()
        gates = torch.ones(num_heads, num_layers, num_heads)
        for head in range(num_heads):
            gates[head, layer, head] = 0.0
        return self._removal_order(inputs, label, gates, num_sequences)

    # ------------------------------------------------------------------ unit scores

    def unit_scores(
        self, inputs: Mapping[str, torch.Tensor], label: int, example_key: str, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Score every unit; higher means masked earlier.

        Returns `[N, L, H, S, S]` scores, a `[N, L, H]` bool tensor marking the matrices ranked by
        attention score because their gradient is zero on every candidate unit, and the number of
        forward passes spent.
        """
        method = self.config.unit_ranking
        num_sequences, seq_len = candidates.shape[0], candidates.shape[-1]
        shape = (num_sequences, self.wrapped.num_layers, self.wrapped.num_heads, seq_len, seq_len)
        no_fallback = torch.zeros(shape[:3], dtype=torch.bool)
        if method == "random":
            generator = torch.Generator().manual_seed(derived_seed(self.config.seed, example_key, "units"))
            return torch.rand(shape, generator=generator), no_fallback, 0

        labels = torch.tensor([label], device=self.wrapped.device)
        saliency_method = "gradient" if method == "gradient-largest" else method
        scores = self.wrapped.attention_saliency(inputs, labels, saliency_method).cpu()
        if method == "score":
            return scores, no_fallback, 1
        if method in ("gradient", "mask-gradient"):
            # Masking lowers a unit's probability, which raises the loss most where dL/dp (or dL/dM)
            # is most negative. Largest dL/dp first ("gradient-largest") lowers the loss instead.
            scores = -scores

        on_candidates = scores.abs() * candidates[:, None, None].to(scores.dtype)
        zero_gradient = on_candidates.amax(dim=(-2, -1)) == 0  # [N, L, H]
        if not zero_gradient.any():
            return scores, no_fallback, 1
        attention = self.wrapped.attention_saliency(inputs, labels, "score").cpu()
        scores = torch.where(zero_gradient[..., None, None], attention, scores)
        return scores, zero_gradient, 2

    # ------------------------------------------------------------------ search

    def attack(
        self,
        inputs: Mapping[str, torch.Tensor],
        label: int,
        example_key: str,
    ) -> SearchResult:
        """Search an adversarial attention mask for one example.

        Args:
            inputs (`Mapping[str, torch.Tensor]`): the encoded example with a leading batch dimension
                of 1: `input_ids` `[1, S]` (or `[1, C, S]` for multiple choice), `attention_mask`, and
                optionally `token_type_ids`.
            label (`int`): the gold label (class index, or choice index).
            example_key (`str`): the example's id; seeds the random rankings.
        """
        started = time.perf_counter()
        device = self.wrapped.device
        inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
        attention_mask = inputs["attention_mask"].reshape(-1, inputs["attention_mask"].shape[-1]).bool().cpu()
        num_sequences = attention_mask.shape[0]

        clean = self._probabilities(inputs, 1)[0]
        clean_prediction = int(clean.argmax())
        result = SearchResult(
            clean_prediction=clean_prediction,
            clean_confidence=float(clean[clean_prediction]),
            attacked=clean_prediction == label,
        )
        if not result.attacked:
            result.model_evaluations = 1
            result.seconds = time.perf_counter() - started
            return result

        candidates = candidate_units(attention_mask, self.config.protect_first_token)  # [N, S, S]
        budgets = [units_per_matrix(self.config.alpha, int(n)) for n in attention_mask.sum(dim=-1).tolist()]
        layer_order = self.rank_layers(inputs, label, example_key, num_sequences)
        scores, fallback, saliency_passes = self.unit_scores(inputs, label, example_key, candidates)
        result.layer_order = layer_order[: self.config.max_layers]

        steps = _GreedySteps(self, inputs, label, example_key, num_sequences, result.layer_order)
        accumulated: list[torch.Tensor] = []  # units added at each step, [m, 5] each
        step_index = 0
        last_probabilities: torch.Tensor | None = None
        while step_index < steps.total:
            chunk = steps.take(step_index, self.config.query_batch_size)
            for layer, head in chunk:
                accumulated.append(select_units(scores, candidates, budgets, layer, head))
            prefixes = [torch.cat(accumulated[: step_index + offset + 1]) for offset in range(len(chunk))]
            mask = SparseUnitMask(
                len(chunk), num_sequences, self.wrapped.num_heads, attention_mask.shape[-1], prefixes, device
            )
            probabilities = self._probabilities(inputs, len(chunk), unit_mask=mask)
            flipped = (probabilities.argmax(dim=-1) != label).nonzero().flatten().tolist()
            if flipped:
                stop = flipped[0]
                result.success = True
                result.queries = step_index + stop + 1
                last_probabilities = probabilities[stop]
                break
            step_index += len(chunk)
            last_probabilities = probabilities[-1]
        else:
            result.queries = steps.total

        used_steps = steps.steps[: result.queries]
        masked = torch.cat(accumulated[: result.queries]) if result.queries else torch.zeros(0, 5, dtype=torch.long)
        result.perturbed_heads = [(int(layer), int(head)) for layer, head in used_steps]
        result.masked_units = [tuple(int(value) for value in unit) for unit in masked.tolist()]
        matrices = {(unit[0], unit[1], unit[2]) for unit in result.masked_units}
        result.num_perturbed_matrices = len(matrices)
        result.candidate_units = sum(int(candidates[sequence].sum()) for sequence, _, _ in matrices)
        result.ranking_fallbacks = sum(bool(fallback[matrix]) for matrix in matrices)
        if last_probabilities is not None:
            prediction = int(last_probabilities.argmax())
            result.adversarial_prediction = prediction
            result.adversarial_confidence = float(last_probabilities[prediction])
        layers_reached = len({layer for layer, _ in used_steps})
        result.model_evaluations = self._count_evaluations(saliency_passes, layers_reached, result.queries)
        result.seconds = time.perf_counter() - started
        return result

    def _count_evaluations(self, saliency_passes: int, layers_reached: int, queries: int) -> int:
        """Count the forward passes the search's decisions need, independent of batch sizes.

        One clean forward, the saliency passes (a forward and backward counts as one), one per
        layer removal and per head removal in each layer the greedy order reached, and the queries.
        Queries that a batch evaluated after the first success are not counted.
        """
        count = 1 + saliency_passes + queries
        if self.config.layer_ranking == "importance":
            count += self.wrapped.num_layers
        if self.config.head_ranking == "importance":
            count += self.wrapped.num_heads * layers_reached
        return count


class _GreedySteps:
    """The greedy order of (layer, head) steps, with each layer's heads ranked when first needed."""

    def __init__(
        self,
        search: HackAttendSearch,
        inputs: Mapping[str, torch.Tensor],
        label: int,
        example_key: str,
        num_sequences: int,
        layers: list[int],
    ) -> None:
        self._rank = lambda layer: search.rank_heads(inputs, label, example_key, num_sequences, layer)
        self._layers = layers
        self._max_heads = search.config.max_heads
        self.total = len(layers) * self._max_heads
        self.steps: list[tuple[int, int]] = []

    def take(self, start: int, count: int) -> list[tuple[int, int]]:
        end = min(start + count, self.total)
        while len(self.steps) < end:
            layer = self._layers[len(self.steps) // self._max_heads]
            self.steps.extend((layer, head) for head in self._rank(layer)[: self._max_heads])
        return self.steps[start:end]


def candidate_units(attention_mask: torch.Tensor, protect_first_token: bool) -> torch.Tensor:
    """Return the `[N, S, S]` bool candidates: units between non-padding tokens, minus protected ones.

    With `protect_first_token`, the key column of each sequence's first non-padding token (the
    `[CLS]` or `<s>` key, unit (0, 0) included) is never a candidate.
    """
    tokens = attention_mask.bool()  # [N, S]
    candidates = tokens[:, :, None] & tokens[:, None, :]
    if protect_first_token:
        for sequence in range(tokens.shape[0]):
            positions = tokens[sequence].nonzero()
            if positions.numel():
                candidates[sequence, :, int(positions[0])] = False
    return candidates


def select_units(
    scores: torch.Tensor, candidates: torch.Tensor, budgets: list[int], layer: int, head: int
) -> torch.Tensor:
    """Return the `[m, 5]` units to mask in head (layer, head): each sequence's top-k candidates by score.

    Ties keep the lower flat index (query-major) first; k is capped by the number of candidates.
    """
    selected: list[torch.Tensor] = []
    seq_len = candidates.shape[-1]
    for sequence, budget in enumerate(budgets):
        allowed = candidates[sequence].flatten()
        count = min(budget, int(allowed.sum()))
        if count == 0:
            continue
        values = scores[sequence, layer, head].flatten().masked_fill(~allowed, float("-inf"))
        order = torch.sort(values, descending=True, stable=True).indices[:count]
        rows = torch.stack(
            [
                torch.full_like(order, sequence),
                torch.full_like(order, layer),
                torch.full_like(order, head),
                order // seq_len,
                order % seq_len,
            ],
            dim=1,
        )
        selected.append(rows)
    if not selected:
        return torch.zeros(0, 5, dtype=torch.long)
    return torch.cat(selected)


def mask_prediction(
    wrapped: AttentionMaskedModel, inputs: Mapping[str, torch.Tensor], units: list[Unit] | torch.Tensor
) -> tuple[int, torch.Tensor]:
    """Return the prediction and class probabilities of one example with `units` masked."""
    device = wrapped.device
    inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
    seq_len = inputs["input_ids"].shape[-1]
    num_sequences = 1
    for size in inputs["input_ids"].shape[1:-1]:
        num_sequences *= size
    unit_tensor = torch.as_tensor(units, dtype=torch.long).reshape(-1, 5)
    mask = SparseUnitMask(1, num_sequences, wrapped.num_heads, seq_len, [unit_tensor], device)
    with torch.no_grad():
        logits = wrapped(**inputs, unit_mask=mask).logits
    probabilities = class_probabilities(logits)[0]
    return int(probabilities.argmax()), probabilities

