"""The HackAttend greedy search over attention units for one example.

Shape letters, as in `attend_robust._state`: N sequences of the example (1, or the number of
choices C for multiple choice), L attention layers, H heads, S sequence length, Q candidate masks
evaluated in one forward pass. A unit is `(sequence, layer, head, query, key)`.

The search, for an example the model predicts correctly:

1. Rank the layers. `importance` removes all heads of one layer (head gates at 0), for each layer
   in batched forwards. Layers whose removal flips the prediction come first. The rest follow by
   the remaining probability of the label, lowest first. Ties (`removals_tied`) keep the lower
   index first.
2. Score every unit once on the clean input (see `HackAttendConfig.unit_ranking`). With
   `gradient`, the units whose cross-entropy gradient dL/dp is most negative come first, because
   masking lowers their probability and so raises the loss. On the MiniLM SST-2 victim of
   `docs/results.md`, largest-first (`gradient-largest`) flipped none of 206 predictions.
3. For each of the top `max_layers` layers, rank its heads the same way, one head removed at a
   time on the clean input. Then, for each of its top `max_heads` heads, add that head's top-k
   candidate units of every sequence to the accumulated mask and query the model with the whole
   mask. Stop at the first query whose prediction differs from the label.

Every candidate mask is fixed once the rankings are known, so the search needs little of the
work a one-query-per-pass implementation does, and still takes every decision that one takes:

- One clean pass per example gives its prediction, its unit saliency (one backward pass) and
  every block's output. A removal or query whose lowest perturbed layer is `l` starts
  at the block of `l` from those outputs, so the layers below `l` are not evaluated again.
- Examples with the same input shape are searched together: their removals and queries share
  forward passes. Each example's queries are evaluated a few at a time in greedy order (1, then
  2, 4, ... up to `query_batch_size`), and the first success ends its search.
- Masks are lists of units, turned into one boolean `[Q * N, H, S, S]` keep-mask per perturbed
  layer while that layer runs.

Batch sizes change speed, never a decision. `attend_robust.hackattend.sequential` is the plain
search (one example, one query per full forward pass) that tests and the benchmark compare with.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch

from .._prefix import PrefixReuse, concatenate_rows, select_rows
from .._state import SaliencyCapture
from ..masked_model import AttentionMaskedModel
from .config import HackAttendConfig

# A masked unit: (sequence, layer, head, query position, key position).
Unit = tuple[int, int, int, int, int]

# Added before flooring alpha * n * n so that products such as 0.29 * 100 = 28.999999999999996
# give the budget the decimal arithmetic intends.
_BUDGET_EPSILON = 1e-9

REMOVAL_TIE_LOG_ODDS = 1e-5
"""Largest difference in the log-odds of the label between two removals that count as tied.

A row of a batched float32 pass can differ from the same row computed alone in the last digits.
On tiny random models, where the logits are large, identical rows differed by up to 2.4e-6 in
probability. Without a tolerance, removals that change nothing (a head whose output is zero,
layers that share weights) would be ordered by that noise, differently in each search.
"""


def units_per_matrix(alpha: float, num_tokens: int) -> int:
    """Return k = max(1, floor(alpha * n * n)), the units masked in one perturbed matrix of n tokens."""
    return max(1, math.floor(alpha * num_tokens * num_tokens + _BUDGET_EPSILON))


def removals_tied(first: float, second: float) -> bool:
    """Return whether two remaining probabilities of the label are equal for the removal rankings.

    Log-odds within `REMOVAL_TIE_LOG_ODDS` are about `p (1 - p) * REMOVAL_TIE_LOG_ODDS` apart in
    probability. One float32 spacing at the larger value is added, because a float32 probability
    near 1 is rounded more coarsely than that.
    """
    middle = (first + second) / 2
    larger = max(first, second)
    spacing = 2.0 ** (math.frexp(larger)[1] - 24) if larger > 0 else 0.0  # float32 has 24 significant bits
    return abs(second - first) <= REMOVAL_TIE_LOG_ODDS * middle * (1 - middle) + spacing


def rank_removals(probabilities: torch.Tensor, label: int) -> list[int]:
    """Order removal variants by how much they hurt the label, worst first.

    `probabilities` contains one row of class probabilities per variant. Variants that flip the
    prediction come first, then the others. Within each part, the lowest remaining probability of
    the label comes first. A variant tied with the one before it in that order (`removals_tied`)
    joins its run of ties, and each run keeps the lower index first.
    """
    flipped = (probabilities.argmax(dim=-1) != label).tolist()
    remaining = probabilities[:, label].tolist()
    order: list[int] = []
    for part in (True, False):
        members = sorted((index for index in range(len(remaining)) if flipped[index] == part),
                         key=lambda index: (remaining[index], index))
        tied: list[int] = []
        for index in members:
            if tied and not removals_tied(remaining[tied[-1]], remaining[index]):
                order.extend(sorted(tied))
                tied = []
            tied.append(index)
        order.extend(sorted(tied))
    return order


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
    model_evaluations: int = 0  # queries plus clean, saliency and ranking forwards (see `count_model_evaluations`)
    perturbed_heads: list[tuple[int, int]] = field(default_factory=list)  # (layer, head) in greedy order
    masked_units: list[Unit] = field(default_factory=list)
    num_perturbed_matrices: int = 0
    candidate_units: int = 0  # candidate units of the perturbed matrices
    ranking_fallbacks: int = 0  # perturbed matrices ranked by attention score because their gradient was zero
    adversarial_prediction: int | None = None
    adversarial_confidence: float | None = None  # probability of `adversarial_prediction` under the last query
    layer_order: list[int] = field(default_factory=list)
    layer_evaluations: int = 0  # attention layers evaluated for this example, reuse and batch waste included
    seconds: float = 0.0

    @property
    def hamming(self) -> float:
        """Mean number of masked units per perturbed attention matrix (0 when nothing was perturbed)."""
        if self.num_perturbed_matrices == 0:
            return 0.0
        return len(self.masked_units) / self.num_perturbed_matrices


class PhaseTimes:
    """Wall seconds a search spent in each phase, summed over every example it searched.

    The phases are `"clean and saliency"` (clean forwards and the saliency passes), `"layer ranking"`,
    `"head ranking"` and `"queries"`. On a GPU the figures include the wait for the device, since
    every phase ends by copying its probabilities to the CPU.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started


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


@dataclass
class _Copy:
    """One copy of a group's example in a forward pass, with its own gates or masked units."""

    example: int  # position of the example in its group
    start_block: int  # first block this copy's perturbation touches; lower blocks are reused
    head_gates: torch.Tensor | None = None  # [L, H]
    units: torch.Tensor | None = None  # [m, 5] masked units


@dataclass
class _ExampleState:
    """Search state of one example of a group."""

    label: int
    key: str
    result: SearchResult
    candidates: torch.Tensor | None = None  # [N, S, S]
    budgets: list[int] = field(default_factory=list)
    scores: torch.Tensor | None = None  # [N, L, H, S, S], higher is masked earlier
    fallback: torch.Tensor | None = None  # [N, L, H]
    accumulated: list[torch.Tensor] = field(default_factory=list)  # units added at each step
    steps: list[tuple[int, int]] = field(default_factory=list)  # (layer, head) at each step
    lowest_layer: int | None = None  # lowest layer perturbed so far
    heads: list[tuple[int, int]] = field(default_factory=list)  # (layer, head) of the current layer, greedy order
    next_head: int = 0  # position in `heads` of the next query
    step_size: int = 1  # queries of this example in the next forward
    last_probabilities: torch.Tensor | None = None  # class probabilities under the last query
    layer_evaluations: int = 0
    done: bool = False


class _Group:
    """Examples of one input shape searched together, with their clean pass's recorded blocks."""

    def __init__(self, examples: list[tuple[Mapping[str, torch.Tensor], int, str]], device: torch.device) -> None:
        names = sorted(examples[0][0])
        self.inputs = {name: torch.cat([inputs[name] for inputs, _, _ in examples]).to(device) for name in names}
        attention_mask = self.inputs["attention_mask"]
        self.num_examples = len(examples)
        self.num_sequences = attention_mask[0].numel() // attention_mask.shape[-1]
        self.seq_len = attention_mask.shape[-1]
        self.attention_mask = attention_mask.reshape(self.num_examples, self.num_sequences, self.seq_len).bool().cpu()
        self.recorded_blocks: dict[int, Any] = {}


class HackAttendSearch:
    """Runs the greedy HackAttend search with an `AttentionMaskedModel`.

    `attack_many` searches several examples at once: examples with the same input shape share
    forward passes, and every pass starts at the lowest block its perturbations touch, from the
    hidden states recorded during the clean pass (see `attend_robust._prefix`). Decisions equal
    those of the one-example, one-query-per-pass search in `attend_robust.hackattend.sequential`.
    """

    def __init__(self, wrapped: AttentionMaskedModel, config: HackAttendConfig) -> None:
        self.wrapped = wrapped
        self.config = config.resolve(wrapped.num_layers, wrapped.num_heads)
        self._layers_per_block = wrapped.attention_layers_per_block
        self.phases = PhaseTimes()
        # Decoder classifiers find each row's last token through `pad_token_id`, and without one they
        # reject passes of several rows. Their copies then run one per pass.
        self._copies_per_pass = self.config.forward_batch_size
        if getattr(wrapped.config, "pad_token_id", None) is None and not wrapped.supports_first_token_only:
            self._copies_per_pass = 1

    def attack(self, inputs: Mapping[str, torch.Tensor], label: int, example_key: str) -> SearchResult:
        """Search an adversarial attention mask for one example.

        Args:
            inputs (`Mapping[str, torch.Tensor]`): the encoded example with a leading batch dimension
                of 1: `input_ids` `[1, S]` (or `[1, C, S]` for multiple choice), `attention_mask`, and
                optionally `token_type_ids`.
            label (`int`): the gold label (class index, or choice index).
            example_key (`str`): the example's id; seeds the random rankings.
        """
        return self.attack_many([(inputs, label, example_key)])[0]

    def attack_many(self, examples: Sequence[tuple[Mapping[str, torch.Tensor], int, str]]) -> list[SearchResult]:
        """Search every example of `examples`, each an `(inputs, label, example_key)` as in `attack`.

        Examples whose tensors have the same shape are searched together, `example_batch_size` at
        a time. Results come back in the order of `examples`; each example's `seconds` is its
        group's wall time divided by the group's size.
        """
        by_shape: dict[tuple, list[int]] = {}
        for position, (inputs, _, key) in enumerate(examples):
            if "labels" in inputs:
                raise ValueError(
                    f"The inputs of example {key!r} contain 'labels'. Leave the label out of the inputs and pass it "
                    "as the second item of (inputs, label, example_key)."
                )
            if "input_ids" not in inputs or "attention_mask" not in inputs:
                raise ValueError(
                    f"The inputs of example {key!r} have the keys {sorted(inputs)}, but the search needs input_ids "
                    "and attention_mask, as a tokenizer returns them."
                )
            shape = tuple((name, tuple(inputs[name].shape)) for name in sorted(inputs))
            by_shape.setdefault(shape, []).append(position)
        results: list[SearchResult | None] = [None] * len(examples)
        size = self.config.example_batch_size
        for positions in by_shape.values():
            for start in range(0, len(positions), size):
                chunk = positions[start : start + size]
                for position, result in zip(chunk, self._attack_group([examples[index] for index in chunk])):
                    results[position] = result
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ one group

    def _attack_group(self, examples: list[tuple[Mapping[str, torch.Tensor], int, str]]) -> list[SearchResult]:
        started = time.perf_counter()
        group = _Group(examples, self.wrapped.device)
        labels = [int(label) for _, label, _ in examples]
        with self.phases.measure("clean and saliency"):
            probabilities, saliency, attention = self._clean_pass(group, labels)

        states: list[_ExampleState] = []
        for position, (_, label, key) in enumerate(examples):
            clean = probabilities[position]
            prediction = int(clean.argmax())
            result = SearchResult(
                clean_prediction=prediction, clean_confidence=float(clean[prediction]), attacked=prediction == label
            )
            state = _ExampleState(label=label, key=key, result=result, done=not result.attacked)
            state.layer_evaluations = self.wrapped.num_layers
            if result.attacked:
                self._prepare_units(state, group, position, saliency[position], attention[position])
            states.append(state)

        attacked = [position for position, state in enumerate(states) if not state.done]
        if attacked:
            with self.phases.measure("layer ranking"):
                self._rank_layers(group, states, attacked)
            for depth in range(self.config.max_layers):
                active = [position for position in attacked if not states[position].done]
                if not active:
                    break
                with self.phases.measure("head ranking"):
                    self._rank_heads(group, states, active, depth)
                with self.phases.measure("queries"):
                    self._query_layer(group, states, active)

        seconds = (time.perf_counter() - started) / len(examples)
        return [self._finish(state, seconds) for state in states]

    def _clean_pass(
        self, group: _Group, labels: list[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Run each clean example once: prediction, recorded blocks, and the unit saliency if needed.

        Returns `[E, K]` probabilities, and per example the `[N, L, H, S, S]` dL/dp (or dL/dM) when
        it is predicted correctly and the unit ranking needs it, and the attention probabilities
        (`None` with random unit ranking). Each example runs alone, as the sequential search runs
        it. Batched saliency differs in the last float digits, which can swap two units whose
        scores nearly tie and so change a mask.
        """
        probabilities, saliency, attention, recorded = [], [], [], []
        for position in range(group.num_examples):
            inputs = {name: tensor[position : position + 1] for name, tensor in group.inputs.items()}
            example = self._clean_example(inputs, labels[position])
            probabilities.append(example[0])
            saliency.append(example[1])
            attention.append(example[2])
            recorded.append(example[3])
        group.recorded_blocks = {
            block: concatenate_rows([outputs[block] for outputs in recorded], group.num_sequences)
            for block in recorded[0]
        }
        return torch.stack(probabilities), saliency, attention

    def _clean_example(
        self, inputs: dict[str, torch.Tensor], label: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[int, Any]]:
        method = self.config.unit_ranking
        gradient_method = {"gradient": "gradient", "gradient-largest": "gradient", "mask-gradient": "mask-gradient"}
        needs_gradient = method in gradient_method
        capture = None if method == "random" else SaliencyCapture(with_probes=needs_gradient)
        plan = self.wrapped.make_plan(inputs, capture=capture, record_blocks=True)
        with torch.set_grad_enabled(needs_gradient):
            logits = self.wrapped.run_plan(plan, **inputs).logits.float()
        probabilities = class_probabilities(logits.detach())[0].cpu()
        recorded = plan.recorded_blocks or {}
        if capture is None:
            return probabilities, None, None, recorded

        num_layers = self.wrapped.num_layers
        attention = torch.stack([capture.probabilities[layer] for layer in range(num_layers)], dim=1).float()
        if not needs_gradient or int(probabilities.argmax()) != label:
            return probabilities, None, attention.cpu(), recorded
        target = torch.tensor([label], device=logits.device)
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        probes = [capture.probes[layer] for layer in range(num_layers)]
        gradients = torch.autograd.grad(loss, probes, allow_unused=True)
        gradient = torch.stack(
            [torch.zeros_like(probe) if value is None else value for probe, value in zip(probes, gradients)], dim=1
        ).float()
        if gradient_method[method] == "mask-gradient":
            gradient = attention * (gradient - (attention * gradient).sum(dim=-1, keepdim=True))
        return probabilities, gradient.cpu(), attention.cpu(), recorded

    def _prepare_units(
        self,
        state: _ExampleState,
        group: _Group,
        position: int,
        saliency: torch.Tensor | None,
        attention: torch.Tensor | None,
    ) -> None:
        """Set the example's candidates, budgets and unit scores (higher is masked earlier).

        `saliency` and `attention` are this example's `[N, L, H, S, S]` tensors from `_clean_pass`.
        """
        attention_mask = group.attention_mask[position]  # [N, S]
        state.candidates = candidate_units(attention_mask, self.config.protect_first_token)
        state.budgets = [units_per_matrix(self.config.alpha, int(n)) for n in attention_mask.sum(dim=-1).tolist()]
        shape = (group.num_sequences, self.wrapped.num_layers, self.wrapped.num_heads, group.seq_len, group.seq_len)
        state.fallback = torch.zeros(shape[:3], dtype=torch.bool)
        method = self.config.unit_ranking
        if method == "random":
            generator = torch.Generator().manual_seed(derived_seed(self.config.seed, state.key, "units"))
            state.scores = torch.rand(shape, generator=generator)
            return
        assert attention is not None
        if method == "score":
            state.scores = attention
            return
        assert saliency is not None
        # Masking lowers a unit's probability, which raises the loss most where dL/dp (or dL/dM) is
        # most negative. Largest dL/dp first ("gradient-largest") lowers the loss instead.
        scores = saliency if method == "gradient-largest" else -saliency
        on_candidates = scores.abs() * state.candidates[:, None, None].to(scores.dtype)
        state.fallback = on_candidates.amax(dim=(-2, -1)) == 0  # [N, L, H]
        state.scores = torch.where(state.fallback[..., None, None], attention, scores)

    # ------------------------------------------------------------------ forwards

    def _block_of(self, layer: int) -> int:
        return layer // self._layers_per_block if self.wrapped.supports_prefix_reuse else 0

    def _evaluate(self, group: _Group, states: list[_ExampleState], copies: list[_Copy]) -> torch.Tensor:
        """Return `[len(copies), K]` class probabilities, one forward per start block and batch."""
        output: list[torch.Tensor | None] = [None] * len(copies)
        by_start: dict[int, list[int]] = {}
        for index, copy in enumerate(copies):
            by_start.setdefault(copy.start_block, []).append(index)
        size = self._copies_per_pass
        for start_block in sorted(by_start):
            indices = by_start[start_block]
            for offset in range(0, len(indices), size):
                chunk = indices[offset : offset + size]
                probabilities = self._forward(group, [copies[index] for index in chunk], start_block)
                cost = (self.wrapped.num_blocks - start_block) * self._layers_per_block
                for index, row in zip(chunk, probabilities):
                    output[index] = row
                    states[copies[index].example].layer_evaluations += cost
        return torch.stack(output)  # type: ignore[arg-type]

    @torch.no_grad()
    def _forward(self, group: _Group, copies: list[_Copy], start_block: int) -> torch.Tensor:
        device = self.wrapped.device
        examples = torch.tensor([copy.example for copy in copies], device=device)
        inputs = {name: tensor.index_select(0, examples) for name, tensor in group.inputs.items()}
        num_sequences = group.num_sequences
        head_gates = None
        if any(copy.head_gates is not None for copy in copies):
            ones = torch.ones(self.wrapped.num_layers, self.wrapped.num_heads)
            per_copy = torch.stack([ones if copy.head_gates is None else copy.head_gates for copy in copies])
            head_gates = per_copy.repeat_interleave(num_sequences, dim=0)  # every sequence of a copy
        unit_mask = None
        if any(copy.units is not None for copy in copies):
            empty = torch.zeros(0, 5, dtype=torch.long)
            unit_mask = SparseUnitMask(
                len(copies), num_sequences, self.wrapped.num_heads, group.seq_len,
                [empty if copy.units is None else copy.units for copy in copies], device,
            )
        prefix = None
        if start_block > 0:
            rows = (examples[:, None] * num_sequences + torch.arange(num_sequences, device=device)).flatten()
            recorded = group.recorded_blocks[start_block - 1]
            prefix = PrefixReuse(start_block, select_rows(recorded, rows, group.num_examples * num_sequences))
        plan = self.wrapped.make_plan(
            inputs, unit_mask=unit_mask, head_gates=head_gates, prefix=prefix,
            first_token_only=self.wrapped.supports_first_token_only,
        )
        return class_probabilities(self.wrapped.run_plan(plan, **inputs).logits).cpu()

    # ------------------------------------------------------------------ rankings

    def _removal_orders(
        self, group: _Group, states: list[_ExampleState], requests: list[tuple[int, list[tuple[int, torch.Tensor]]]]
    ) -> list[list[int]]:
        """Order each request's removal variants by how much they hurt the label (`rank_removals`).

        A request is `(example, variants)`, each variant a `(start block, [L, H] gates)` pair.
        """
        copies = [
            _Copy(example, start_block, head_gates=gates) for example, variants in requests for start_block, gates in variants
        ]
        probabilities = self._evaluate(group, states, copies)
        orders: list[list[int]] = []
        offset = 0
        for example, variants in requests:
            orders.append(rank_removals(probabilities[offset : offset + len(variants)], states[example].label))
            offset += len(variants)
        return orders

    def _rank_layers(self, group: _Group, states: list[_ExampleState], examples: list[int]) -> None:
        """Set each example's layer order: all of the model's layers ranked, the top `max_layers` kept."""
        num_layers, num_heads = self.wrapped.num_layers, self.wrapped.num_heads
        if self.config.layer_ranking == "random":
            orders = []
            for example in examples:
                seed = derived_seed(self.config.seed, states[example].key, "layers")
                orders.append(torch.randperm(num_layers, generator=torch.Generator().manual_seed(seed)).tolist())
        else:
            variants = []
            for layer in range(num_layers):
                gates = torch.ones(num_layers, num_heads)
                gates[layer] = 0.0
                variants.append((self._block_of(layer), gates))  # each removal starts at its own block
            orders = self._removal_orders(group, states, [(example, variants) for example in examples])
        for example, order in zip(examples, orders):
            states[example].result.layer_order = order[: self.config.max_layers]

    def _rank_heads(self, group: _Group, states: list[_ExampleState], examples: list[int], depth: int) -> None:
        """Set each example's `heads`: the top `max_heads` heads of the layer at `depth` of its layer order."""
        num_layers, num_heads = self.wrapped.num_layers, self.wrapped.num_heads
        requests = []
        for example in examples:
            state = states[example]
            layer = state.result.layer_order[depth]
            state.next_head = 0
            if self.config.head_ranking == "random":
                seed = derived_seed(self.config.seed, state.key, f"heads-{layer}")
                order = torch.randperm(num_heads, generator=torch.Generator().manual_seed(seed)).tolist()
                state.heads = [(layer, head) for head in order[: self.config.max_heads]]
                continue
            variants = []
            for head in range(num_heads):
                gates = torch.ones(num_layers, num_heads)
                gates[layer, head] = 0.0
                variants.append((self._block_of(layer), gates))
            requests.append((example, variants))
        if requests:
            for (example, _), order in zip(requests, self._removal_orders(group, states, requests)):
                layer = states[example].result.layer_order[depth]
                states[example].heads = [(layer, head) for head in order[: self.config.max_heads]]

    # ------------------------------------------------------------------ queries

    def _query_layer(self, group: _Group, states: list[_ExampleState], examples: list[int]) -> None:
        """Query the heads of the current layer of each example until it flips or the layer ends.

        Each round evaluates the next `step_size` candidate masks of every example still in the
        layer. The step size starts at 1 and doubles up to `query_batch_size`. So the queries
        evaluated after a success are never more than those before it.
        """
        pending = [example for example in examples if states[example].heads]
        while pending:
            copies: list[_Copy] = []
            spans: list[tuple[int, int]] = []  # (example, number of its copies)
            for example in pending:
                state = states[example]
                count = min(state.step_size, len(state.heads) - state.next_head)
                for layer, head in state.heads[state.next_head : state.next_head + count]:
                    state.accumulated.append(select_units(state.scores, state.candidates, state.budgets, layer, head))
                    state.steps.append((layer, head))
                    state.lowest_layer = layer if state.lowest_layer is None else min(state.lowest_layer, layer)
                    copies.append(_Copy(example, self._block_of(state.lowest_layer), units=torch.cat(state.accumulated)))
                spans.append((example, count))
            probabilities = self._evaluate(group, states, copies)

            offset = 0
            still_pending = []
            for example, count in spans:
                state = states[example]
                rows = probabilities[offset : offset + count]
                offset += count
                flipped = (rows.argmax(dim=-1) != state.label).nonzero().flatten().tolist()
                done_before = len(state.steps) - count
                if flipped:
                    stop = flipped[0]
                    state.result.success = True
                    state.result.queries = done_before + stop + 1
                    state.last_probabilities = rows[stop]
                    state.done = True
                    continue
                state.result.queries = len(state.steps)
                state.last_probabilities = rows[-1]
                state.next_head += count
                state.step_size = min(2 * state.step_size, self.config.query_batch_size)
                if state.next_head < len(state.heads):
                    still_pending.append(example)
            pending = still_pending

    # ------------------------------------------------------------------ results

    def _finish(self, state: _ExampleState, seconds: float) -> SearchResult:
        result = state.result
        result.seconds = seconds
        result.layer_evaluations = state.layer_evaluations
        if not result.attacked:
            result.model_evaluations = 1
            return result
        used_steps = state.steps[: result.queries]
        masked = torch.cat(state.accumulated[: result.queries]) if result.queries else torch.zeros(0, 5, dtype=torch.long)
        result.perturbed_heads = [(int(layer), int(head)) for layer, head in used_steps]
        record_mask(result, masked, state.candidates, state.fallback)
        last = state.last_probabilities
        if last is not None:
            prediction = int(last.argmax())
            result.adversarial_prediction = prediction
            result.adversarial_confidence = float(last[prediction])
        layers_reached = len({layer for layer, _ in used_steps})
        result.model_evaluations = count_model_evaluations(
            self.config, self.wrapped.num_layers, self.wrapped.num_heads, layers_reached, result.queries
        )
        return result


def record_mask(result: SearchResult, masked: torch.Tensor, candidates: torch.Tensor, fallback: torch.Tensor) -> None:
    """Store the `[m, 5]` masked units in `result`, with the counts of matrices, candidates and fallbacks."""
    result.masked_units = [tuple(int(value) for value in unit) for unit in masked.tolist()]
    matrices = {(unit[0], unit[1], unit[2]) for unit in result.masked_units}
    result.num_perturbed_matrices = len(matrices)
    result.candidate_units = sum(int(candidates[sequence].sum()) for sequence, _, _ in matrices)
    result.ranking_fallbacks = sum(bool(fallback[matrix]) for matrix in matrices)


def count_model_evaluations(
    config: HackAttendConfig, num_layers: int, num_heads: int, layers_reached: int, queries: int
) -> int:
    """Count the forward passes the search's decisions need, independent of batching and reuse.

    One clean forward, one saliency pass (forward and backward) unless units are ranked at random,
    one pass per layer removal and per head removal in each layer the greedy order reached, and
    the queries. Queries that a batch evaluated after the first success are not counted.
    """
    count = 1 + queries + (config.unit_ranking != "random")
    if config.layer_ranking == "importance":
        count += num_layers
    if config.head_ranking == "importance":
        count += num_heads * layers_reached
    return count


def minimum_layer_evaluations(
    config: HackAttendConfig, num_layers: int, num_heads: int, layers_per_block: int,
    attacked: bool, perturbed_heads: Sequence[Sequence[int]],
) -> int:
    """Return the fewest attention-layer evaluations a search with these decisions can make.

    Each needed pass (`count_model_evaluations`) costs the layers from the block of its lowest
    perturbed layer to the top. The clean pass, which also gives the saliency, costs all `L`
    layers. The removal of layer `l`, or of one of its heads, costs `L - l`. A query costs the
    layers from the lowest layer of its accumulated mask. Backward passes are not counted.
    """
    def cost(layer: int) -> int:
        return num_layers - (layer // layers_per_block) * layers_per_block

    total = num_layers
    if not attacked:
        return total
    if config.layer_ranking == "importance":
        total += sum(cost(layer) for layer in range(num_layers))
    seen: list[int] = []
    lowest: int | None = None
    for layer, _ in perturbed_heads:
        if layer not in seen:
            seen.append(layer)
            if config.head_ranking == "importance":
                total += num_heads * cost(layer)
        lowest = layer if lowest is None else min(lowest, layer)
        total += cost(lowest)
    return total


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

