"""Semantics of the HackAttend greedy search on tiny models."""

from __future__ import annotations

import pytest
import torch
from hackattend_support import budget, flippy_bert, predict, random_examples, reference_search
from tiny_models import build_tiny_model, make_batch

from attend_robust import AttentionMaskedModel
from attend_robust.hackattend import HackAttendConfig, HackAttendSearch
from attend_robust.hackattend.search import candidate_units, mask_prediction, units_per_matrix


def _correct_examples(wrapped, count, *, choices=None, seed=0):
    """Yield (inputs, label, key) for random examples, labelled with the model's own prediction."""
    for inputs, key in random_examples(count, choices=choices, seed=seed):
        yield inputs, int(predict(wrapped, inputs)[0].argmax()), key


@pytest.fixture(scope="module")
def wrapped_bert():
    return AttentionMaskedModel(flippy_bert())


@pytest.fixture(scope="module")
def wrapped_choice_bert():
    return AttentionMaskedModel(flippy_bert(multiple_choice=True))


# ---------------------------------------------------------------------------------------------- budget


@pytest.mark.parametrize(
    "alpha, tokens, expected",
    [(0.01, 15, 2), (0.01, 5, 1), (0.01, 10, 1), (0.01, 100, 100), (0.29, 10, 29), (0.07, 10, 7), (1.0, 3, 9)],
)
def test_units_per_matrix(alpha, tokens, expected):
    assert units_per_matrix(alpha, tokens) == expected


def test_candidates_exclude_padding_and_first_key():
    attention_mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    candidates = candidate_units(attention_mask, protect_first_token=True)
    assert candidates[0, :3, 1:3].all()
    assert not candidates[0, :, 0].any()
    assert not candidates[0, 3, :].any()
    assert not candidates[0, :, 3].any()
    # Left padding: the first non-padding token is position 1.
    assert not candidates[1, :, 1].any()
    assert not candidates[1, 0, :].any()
    assert int(candidates[1].sum()) == 3 * 2


def test_candidates_unprotected_cover_all_tokens():
    attention_mask = torch.tensor([[1, 1, 1, 0]])
    assert int(candidate_units(attention_mask, protect_first_token=False).sum()) == 9


# ---------------------------------------------------------------------------------------------- search


def test_search_matches_reference_loop(wrapped_bert):
    config = HackAttendConfig(alpha=0.2, query_batch_size=5, forward_batch_size=3)
    search = HackAttendSearch(wrapped_bert, config)
    successes = 0
    for inputs, label, key in _correct_examples(wrapped_bert, 12):
        result = search.attack(inputs, label, key)
        success, queries, masked, heads = reference_search(wrapped_bert, inputs, label, alpha=0.2, max_layers=2,
                                                           max_heads=4)
        assert result.success == success, key
        assert result.queries == queries, key
        assert sorted(result.masked_units) == masked, key
        assert result.perturbed_heads == heads, key
        successes += success
    # The fixture is meant to give both outcomes; if this fails the test checks too little.
    assert 0 < successes < 12


@pytest.mark.parametrize("unit_ranking", ["gradient", "gradient-largest", "mask-gradient", "score", "random"])
def test_batch_sizes_do_not_change_decisions(wrapped_bert, unit_ranking):
    kwargs = dict(alpha=0.2, unit_ranking=unit_ranking, seed=3)
    batched = HackAttendSearch(wrapped_bert, HackAttendConfig(**kwargs, query_batch_size=16, forward_batch_size=16))
    one_by_one = HackAttendSearch(wrapped_bert, HackAttendConfig(**kwargs, query_batch_size=1, forward_batch_size=1))
    for inputs, label, key in _correct_examples(wrapped_bert, 8, seed=1):
        first = batched.attack(inputs, label, key)
        second = one_by_one.attack(inputs, label, key)
        assert first.success == second.success, key
        assert first.queries == second.queries, key
        assert first.masked_units == second.masked_units, key
        assert first.perturbed_heads == second.perturbed_heads, key
        assert first.model_evaluations == second.model_evaluations, key


def test_other_unit_rankings_match_reference(wrapped_bert):
    for unit_ranking in ("gradient-largest", "mask-gradient", "score"):
        search = HackAttendSearch(wrapped_bert, HackAttendConfig(alpha=0.2, unit_ranking=unit_ranking))
        for inputs, label, key in _correct_examples(wrapped_bert, 4, seed=2):
            result = search.attack(inputs, label, key)
            success, queries, masked, _ = reference_search(wrapped_bert, inputs, label, alpha=0.2, max_layers=2,
                                                           max_heads=4, unit_ranking=unit_ranking)
            assert (result.success, result.queries) == (success, queries), (unit_ranking, key)
            assert sorted(result.masked_units) == masked, (unit_ranking, key)


def test_mask_accumulates_and_stops_at_first_flip(wrapped_bert):
    search = HackAttendSearch(wrapped_bert, HackAttendConfig(alpha=0.2))
    checked = 0
    for inputs, label, key in _correct_examples(wrapped_bert, 12):
        result = search.attack(inputs, label, key)
        if not result.success or result.queries < 2:
            continue
        # Every earlier accumulated mask kept the prediction; the full one flips it.
        for step in range(1, result.queries):
            heads = set(result.perturbed_heads[:step])
            prefix = [unit for unit in result.masked_units if (unit[1], unit[2]) in heads]
            prediction, _ = mask_prediction(wrapped_bert, inputs, prefix)
            assert prediction == label, (key, step)
        prediction, _ = mask_prediction(wrapped_bert, inputs, result.masked_units)
        assert prediction != label
        assert prediction == result.adversarial_prediction
        checked += 1
    assert checked > 0


def test_masked_units_respect_budget_and_protection(wrapped_bert):
    search = HackAttendSearch(wrapped_bert, HackAttendConfig(alpha=0.2))
    for inputs, label, key in _correct_examples(wrapped_bert, 6):
        result = search.attack(inputs, label, key)
        tokens = int(inputs["attention_mask"].sum())
        per_head: dict[tuple[int, int], int] = {}
        for sequence, layer, head, query, unit_key in result.masked_units:
            assert unit_key != 0, "the first token's key column is protected"
            assert query < tokens, "padding queries are never masked"
            assert unit_key < tokens, "padding keys are never masked"
            per_head[(layer, head)] = per_head.get((layer, head), 0) + 1
        assert list(per_head) == result.perturbed_heads
        assert all(count == budget(0.2, tokens) for count in per_head.values())
        assert result.num_perturbed_matrices == len(result.perturbed_heads)
        assert result.hamming == pytest.approx(len(result.masked_units) / len(result.perturbed_heads))


def test_failure_tries_every_allowed_head(wrapped_bert):
    search = HackAttendSearch(wrapped_bert, HackAttendConfig(alpha=0.01, max_layers=1, max_heads=3))
    for inputs, label, key in _correct_examples(wrapped_bert, 4):
        result = search.attack(inputs, label, key)
        if result.success:
            continue
        assert result.queries == 3
        assert len(result.perturbed_heads) == 3
        assert {layer for layer, _ in result.perturbed_heads} == {result.layer_order[0]}
        assert result.model_evaluations == 1 + 1 + 2 + 4 + 3  # clean, gradient, layers, heads, queries


def test_layer_order_follows_removal_importance(wrapped_bert):
    search = HackAttendSearch(wrapped_bert, HackAttendConfig(alpha=0.2))
    inputs, label, key = next(_correct_examples(wrapped_bert, 1, seed=5))
    result = search.attack(inputs, label, key)
    keyed = []
    for layer in range(2):
        gates = torch.ones(2, 4)
        gates[layer] = 0
        probabilities = predict(wrapped_bert, inputs, head_gates=gates)[0]
        keyed.append((int(probabilities.argmax()) == label, float(probabilities[label]), layer))
    assert result.layer_order == [layer for _, _, layer in sorted(keyed)]


def test_random_rankings_are_seeded(wrapped_bert):
    config = dict(alpha=0.2, unit_ranking="random", layer_ranking="random", head_ranking="random")
    inputs, label, key = next(_correct_examples(wrapped_bert, 1, seed=4))
    first = HackAttendSearch(wrapped_bert, HackAttendConfig(**config, seed=1)).attack(inputs, label, key)
    again = HackAttendSearch(wrapped_bert, HackAttendConfig(**config, seed=1)).attack(inputs, label, key)
    other = HackAttendSearch(wrapped_bert, HackAttendConfig(**config, seed=2)).attack(inputs, label, key)
    assert first.masked_units == again.masked_units
    assert first.perturbed_heads == again.perturbed_heads
    assert (first.masked_units, first.perturbed_heads) != (other.masked_units, other.perturbed_heads)
    # Random rankings spend no forward pass on ranking: the clean pass and the queries only.
    assert first.model_evaluations == 1 + first.queries


def test_zero_gradient_head_falls_back_to_attention_score():
    model = flippy_bert()
    # A head whose value projection is zero contributes nothing, so dL/dp is zero on all its units.
    attention = model.bert.encoder.layer[1].attention.self
    with torch.no_grad():
        attention.value.weight[0:8] = 0.0
        attention.value.bias[0:8] = 0.0
    wrapped = AttentionMaskedModel(model)
    search = HackAttendSearch(wrapped, HackAttendConfig(alpha=0.01, max_layers=2, max_heads=4))
    for inputs, label, key in _correct_examples(wrapped, 10, seed=6):
        result = search.attack(inputs, label, key)
        if (1, 0) in result.perturbed_heads:
            break
    else:
        pytest.skip("every search stopped before reaching the zeroed head")
    assert result.ranking_fallbacks == 1, "only the zeroed head has no gradient"
    # The attention scores come from the gradient pass: no extra pass is counted.
    assert result.model_evaluations == 1 + 1 + 2 + 4 * len({layer for layer, _ in result.perturbed_heads}) + result.queries
    # Its units are the top-k by attention probability.
    attention_scores = wrapped.attention_saliency(inputs, torch.tensor([label]), "score")[0, 1, 0]
    candidates = candidate_units(inputs["attention_mask"], True)[0]
    chosen = [(query, unit_key) for _, layer, head, query, unit_key in result.masked_units if (layer, head) == (1, 0)]
    ranked = sorted(
        ((-float(attention_scores[q, k]), q, k) for q, k in candidates.nonzero().tolist()),
    )
    assert chosen == [(q, k) for _, q, k in ranked[: len(chosen)]]


def test_misclassified_example_is_not_attacked(wrapped_bert):
    search = HackAttendSearch(wrapped_bert, HackAttendConfig())
    inputs, label, key = next(_correct_examples(wrapped_bert, 1))
    result = search.attack(inputs, 1 - label, key)
    assert not result.attacked
    assert result.queries == 0
    assert result.masked_units == []


def test_caps_larger_than_model_are_rejected(wrapped_bert):
    with pytest.raises(ValueError, match="max_heads=5 exceeds the model"):
        HackAttendSearch(wrapped_bert, HackAttendConfig(max_heads=5))


# ---------------------------------------------------------------------------------------------- multiple choice


def test_multiple_choice_matches_reference(wrapped_choice_bert):
    search = HackAttendSearch(wrapped_choice_bert, HackAttendConfig(alpha=0.05, query_batch_size=3))
    outcomes = set()
    for inputs, label, key in _correct_examples(wrapped_choice_bert, 6, choices=3, seed=7):
        result = search.attack(inputs, label, key)
        success, queries, masked, heads = reference_search(wrapped_choice_bert, inputs, label, alpha=0.05,
                                                           max_layers=2, max_heads=4)
        assert (result.success, result.queries) == (success, queries), key
        assert sorted(result.masked_units) == masked, key
        assert result.perturbed_heads == heads
        # Each perturbed head is masked in every choice's own attention matrix.
        assert {unit[0] for unit in result.masked_units} == {0, 1, 2}
        assert result.num_perturbed_matrices == 3 * len(result.perturbed_heads)
        outcomes.add(success)
    assert outcomes == {True, False}


@pytest.mark.parametrize("architecture", ["distilbert", "deberta-v2", "albert"])
def test_search_runs_on_other_architectures(architecture):
    wrapped = AttentionMaskedModel(build_tiny_model(architecture, num_labels=3))
    batch = make_batch(architecture, lengths=(9, 6))
    batched = HackAttendSearch(wrapped, HackAttendConfig(alpha=0.3, query_batch_size=8))
    one_by_one = HackAttendSearch(wrapped, HackAttendConfig(alpha=0.3, query_batch_size=1, forward_batch_size=1))
    for row in range(2):
        inputs = {name: tensor[row : row + 1] for name, tensor in batch.items()}
        label = int(predict(wrapped, inputs)[0].argmax())
        first = batched.attack(inputs, label, str(row))
        second = one_by_one.attack(inputs, label, str(row))
        assert (first.success, first.queries, first.masked_units) == (second.success, second.queries,
                                                                      second.masked_units)


def test_gradient_ranking_masks_most_negative_first(wrapped_bert):
    inputs, label, key = next(_correct_examples(wrapped_bert, 1, seed=8))
    gradient = wrapped_bert.attention_saliency(inputs, torch.tensor([label]), "gradient")[0]
    candidates = candidate_units(inputs["attention_mask"], True)[0]
    for unit_ranking, sign in (("gradient", 1.0), ("gradient-largest", -1.0)):
        search = HackAttendSearch(wrapped_bert, HackAttendConfig(alpha=0.2, unit_ranking=unit_ranking))
        result = search.attack(inputs, label, key)
        layer, head = result.perturbed_heads[0]
        chosen = [(q, k) for _, l, h, q, k in result.masked_units if (l, h) == (layer, head)]
        ranked = sorted((sign * float(gradient[layer, head, q, k]), q, k) for q, k in candidates.nonzero().tolist())
        assert chosen == [(q, k) for _, q, k in ranked[: len(chosen)]], unit_ranking
