"""The batched search with prefix reuse against the sequential search: the same decisions, less work."""

from __future__ import annotations

import pytest
import torch
from hackattend_support import flippy_bert, predict
from tiny_models import ARCHITECTURES, build_tiny_model, make_batch

from attend_robust import AttentionMaskedModel
from attend_robust.hackattend import HackAttendConfig, HackAttendSearch
from attend_robust.hackattend.search import minimum_layer_evaluations, rank_removals, removals_tied
from attend_robust.hackattend.sequential import SequentialHackAttendSearch

DECISIONS = (
    "clean_prediction", "attacked", "success", "queries", "model_evaluations", "perturbed_heads", "masked_units",
    "num_perturbed_matrices", "candidate_units", "ranking_fallbacks", "adversarial_prediction", "layer_order",
)


def _examples(wrapped, count, *, choices=None, lengths=(7, 11), seed=0, vocab_size=1000):
    """Return `(inputs, label, key)` examples padded to one of `lengths`, so that several share a shape.

    Labels are the model's predictions, except every fifth, which is wrong (not attacked).
    """
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        sequences = choices or 1
        seq_len = lengths[index % len(lengths)]
        input_ids = torch.randint(5, vocab_size, (sequences, seq_len), generator=generator)
        attention_mask = torch.ones(sequences, seq_len, dtype=torch.long)
        for row in range(sequences):
            attention_mask[row, int(torch.randint(4, seq_len + 1, (1,), generator=generator)):] = 0
        input_ids = input_ids.masked_fill(attention_mask == 0, 0)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if choices is not None:
            inputs = {name: tensor[None] for name, tensor in inputs.items()}
        probabilities = predict(wrapped, inputs)[0]
        label = int(probabilities.argmax())
        if index % 5 == 4:
            label = (label + 1) % probabilities.numel()
        examples.append((inputs, label, f"example-{index}"))
    return examples


def _assert_same_decisions(fast, sequential, examples):
    for (_, _, key), first, second in zip(examples, fast, sequential):
        for name in DECISIONS:
            assert getattr(first, name) == getattr(second, name), (key, name)
        if first.adversarial_confidence is not None:
            assert first.adversarial_confidence == pytest.approx(second.adversarial_confidence, rel=1e-4), key


@pytest.fixture(scope="module")
def wrapped_bert():
    return AttentionMaskedModel(flippy_bert(num_layers=3, num_heads=4))


@pytest.fixture(scope="module")
def wrapped_choice_bert():
    return AttentionMaskedModel(flippy_bert(num_layers=3, num_heads=4, multiple_choice=True))


@pytest.mark.parametrize(
    "rankings",
    [
        dict(unit_ranking="gradient"),
        dict(unit_ranking="gradient-largest"),
        dict(unit_ranking="mask-gradient"),
        dict(unit_ranking="score"),
        dict(unit_ranking="random", layer_ranking="random", head_ranking="random"),
        dict(unit_ranking="gradient", layer_ranking="random"),
        dict(unit_ranking="gradient", max_layers=2, max_heads=3),
    ],
    ids=["gradient", "gradient-largest", "mask-gradient", "score", "all-random", "random-layers", "half-scale"],
)
def test_attack_many_matches_sequential_search(wrapped_bert, rankings):
    examples = _examples(wrapped_bert, 20)
    config = HackAttendConfig(alpha=0.15, seed=5, example_batch_size=6, forward_batch_size=7, query_batch_size=4,
                              **rankings)
    fast = HackAttendSearch(wrapped_bert, config).attack_many(examples)
    sequential = SequentialHackAttendSearch(wrapped_bert, config)
    reference = [sequential.attack(*example) for example in examples]
    _assert_same_decisions(fast, reference, examples)
    outcomes = {(result.attacked, result.success) for result in fast}
    assert (False, False) in outcomes and (True, False) in outcomes or (True, True) in outcomes
    if rankings == dict(unit_ranking="gradient"):
        # The fixture is meant to give every outcome; if this fails the test checks too little.
        assert outcomes == {(False, False), (True, False), (True, True)}


def test_multiple_choice_matches_sequential_search(wrapped_choice_bert):
    examples = _examples(wrapped_choice_bert, 12, choices=3, lengths=(9, 13), seed=2)
    config = HackAttendConfig(alpha=0.05, example_batch_size=4, query_batch_size=3)
    fast = HackAttendSearch(wrapped_choice_bert, config).attack_many(examples)
    sequential = SequentialHackAttendSearch(wrapped_choice_bert, config)
    _assert_same_decisions(fast, [sequential.attack(*example) for example in examples], examples)
    assert {result.success for result in fast if result.attacked} == {True, False}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_matches_sequential_search(architecture):
    wrapped = AttentionMaskedModel(build_tiny_model(architecture, num_labels=3))
    assert wrapped.supports_prefix_reuse
    batch = make_batch(architecture, lengths=(9, 9, 6, 9))
    examples = []
    for row in range(4):
        inputs = {name: tensor[row : row + 1] for name, tensor in batch.items()}
        examples.append((inputs, int(predict(wrapped, inputs)[0].argmax()), str(row)))
    config = HackAttendConfig(alpha=0.3, query_batch_size=2)
    fast = HackAttendSearch(wrapped, config).attack_many(examples)
    sequential = SequentialHackAttendSearch(wrapped, config)
    _assert_same_decisions(fast, [sequential.attack(*example) for example in examples], examples)


def test_single_queries_reach_minimum(wrapped_bert):
    examples = _examples(wrapped_bert, 15, seed=3)
    kwargs = dict(alpha=0.15)
    one = HackAttendSearch(wrapped_bert, HackAttendConfig(**kwargs, query_batch_size=1)).attack_many(examples)
    many = HackAttendSearch(wrapped_bert, HackAttendConfig(**kwargs, query_batch_size=16)).attack_many(examples)
    sequential = SequentialHackAttendSearch(wrapped_bert, HackAttendConfig(**kwargs))
    config = HackAttendConfig(**kwargs).resolve(3, 4)
    for example, first, second in zip(examples, one, many):
        minimum = minimum_layer_evaluations(config, 3, 4, 1, first.attacked, first.perturbed_heads)
        assert first.layer_evaluations == minimum, example[2]
        assert minimum <= second.layer_evaluations
        # A success ends the search; a later query in the same step may be wasted, never more than before it.
        assert second.layer_evaluations - minimum <= 3 * max(second.queries - 1, 0)
        assert sequential.attack(*example).layer_evaluations >= minimum
    assert any(result.queries > 1 for result in many)


def test_minimum_counts_each_pass_from_its_lowest_layer():
    config = HackAttendConfig().resolve(4, 2)
    # Clean 4; layer removals 4 + 3 + 2 + 1; heads of layer 3 (2 x 1) and of layer 1 (2 x 3);
    # queries (3,0) -> 1, (3,1) -> 1, (1,0) -> 3.
    assert minimum_layer_evaluations(config, 4, 2, 1, True, [(3, 0), (3, 1), (1, 0)]) == 4 + 10 + 2 + 6 + 1 + 1 + 3
    assert minimum_layer_evaluations(config, 4, 2, 1, False, []) == 4
    # Two attention layers per block: a pass starts at the block's first layer.
    assert minimum_layer_evaluations(config, 4, 2, 2, True, [(3, 0)]) == 4 + (4 + 4 + 2 + 2) + 2 * 2 + 2


def test_examples_of_one_shape_share_forward_passes(wrapped_bert):
    examples = _examples(wrapped_bert, 8, lengths=(10,), seed=4)
    calls = {"count": 0}
    real_run_plan = wrapped_bert.run_plan

    def counting_run_plan(plan, *args, **inputs):
        calls["count"] += 1
        return real_run_plan(plan, *args, **inputs)

    wrapped_bert.run_plan = counting_run_plan
    try:
        config = HackAttendConfig(alpha=0.15, example_batch_size=8, forward_batch_size=256)
        together = HackAttendSearch(wrapped_bert, config).attack_many(examples)
        passes_together = calls["count"]
        calls["count"] = 0
        alone = [HackAttendSearch(wrapped_bert, config).attack(*example) for example in examples]
        passes_alone = calls["count"]
    finally:
        del wrapped_bert.run_plan
    _assert_same_decisions(together, alone, examples)
    assert passes_together < passes_alone / 2


def test_random_rankings_need_no_ranking_passes(wrapped_bert):
    config = HackAttendConfig(alpha=0.15, unit_ranking="random", layer_ranking="random", head_ranking="random",
                              query_batch_size=1)
    for result in HackAttendSearch(wrapped_bert, config).attack_many(_examples(wrapped_bert, 6, seed=6)):
        resolved = config.resolve(3, 4)
        assert result.layer_evaluations == minimum_layer_evaluations(resolved, 3, 4, 1, result.attacked,
                                                                     result.perturbed_heads)
        assert result.model_evaluations == 1 + result.queries if result.attacked else 1


def test_model_without_prefix_reuse_runs_full_passes(wrapped_bert):
    examples = _examples(wrapped_bert, 10, seed=7)
    config = HackAttendConfig(alpha=0.15, query_batch_size=1)
    with_reuse = HackAttendSearch(wrapped_bert, config).attack_many(examples)
    blocks = wrapped_bert._blocks
    wrapped_bert._blocks = None  # as for a model whose blocks cannot be found
    try:
        assert not wrapped_bert.supports_prefix_reuse
        without_reuse = HackAttendSearch(wrapped_bert, config).attack_many(examples)
    finally:
        wrapped_bert._blocks = blocks
    _assert_same_decisions(without_reuse, with_reuse, examples)
    for result in without_reuse:
        passes = 1 + (result.model_evaluations - 2 if result.attacked else 0)  # the gradient shares the clean pass
        assert result.layer_evaluations == 3 * passes
    assert sum(r.layer_evaluations for r in with_reuse) < sum(r.layer_evaluations for r in without_reuse)


@pytest.mark.parametrize("architecture", ["bert", "gpt2"])
def test_search_uses_first_token_passes(architecture, monkeypatch):
    wrapped = AttentionMaskedModel(build_tiny_model(architecture, num_labels=3))
    batch = make_batch(architecture, lengths=(9, 9))
    rows = [{name: tensor[row : row + 1] for name, tensor in batch.items()} for row in range(2)]
    examples = [(inputs, int(predict(wrapped, inputs)[0].argmax()), str(row)) for row, inputs in enumerate(rows)]
    flags = []
    make_plan = wrapped.make_plan

    def spy(*args, **kwargs):
        flags.append((kwargs.get("record_blocks", False), kwargs.get("first_token_only", False)))
        return make_plan(*args, **kwargs)

    monkeypatch.setattr(wrapped, "make_plan", spy)
    HackAttendSearch(wrapped, HackAttendConfig(alpha=0.3, unit_ranking="score")).attack_many(examples)
    clean = [first_token for record_blocks, first_token in flags if record_blocks]
    evaluations = [first_token for record_blocks, first_token in flags if not record_blocks]
    assert clean == [False, False]  # the clean pass keeps every position for the saliency
    assert evaluations and set(evaluations) == {architecture == "bert"}


def test_near_tied_removals_keep_index_order():
    # Columns: p(label 0), p(other). Variant 3 flips the prediction, so it comes first. Near 0.6 the
    # tolerance is 0.24 * 1e-5 in probability, plus one float32 spacing.
    probabilities = torch.tensor([
        [0.70, 0.30],
        [0.60, 0.40],
        [0.60 + 2e-6, 0.40 - 2e-6],
        [0.20, 0.80],
        [0.60 - 1e-6, 0.40 + 1e-6],
        [0.65, 0.35],
    ], dtype=torch.float64)
    assert rank_removals(probabilities, 0) == [3, 1, 2, 4, 5, 0]
    # Outside the tolerance the lower probability comes first again.
    probabilities[4] = torch.tensor([0.60 - 5e-6, 0.40 + 5e-6])
    assert rank_removals(probabilities, 0) == [3, 4, 1, 2, 5, 0]


@pytest.mark.parametrize(
    "first, second, tied",
    [
        (0.6, 0.6 + 2e-6, True),
        (0.6, 0.6 + 5e-6, False),
        (0.99999, 0.99998, False),  # 0.7 apart in log-odds
        (0.99999, 0.99999 + 2**-24, True),  # one float32 spacing
        (1e-6, 1.1e-6, False),
        (1e-6, 1e-6 * (1 + 5e-6), True),
    ],
)
def test_removal_ties_use_log_odds(first, second, tied):
    assert removals_tied(first, second) is tied
    assert removals_tied(second, first) is tied


def _zero_head_values(model, heads):
    """Make heads output nothing, so that removing any of them changes nothing: an exact tie."""
    size = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer, head in heads:
            value = model.bert.encoder.layer[layer].attention.self.value
            value.weight[head * size : (head + 1) * size] = 0
            value.bias[head * size : (head + 1) * size] = 0


def test_tied_removals_take_sequential_order():
    model = flippy_bert(num_layers=3, num_heads=4, seed=3)
    _zero_head_values(model, [(0, 1), (0, 2), (1, 0), (1, 2), (1, 3), (2, 0), (2, 1)])
    wrapped = AttentionMaskedModel(model)
    examples = _examples(wrapped, 12, lengths=(10,), seed=4)
    sequential = SequentialHackAttendSearch(wrapped, HackAttendConfig(alpha=0.01))
    reference = [sequential.attack(*example) for example in examples]
    assert any(len(result.perturbed_heads) > 4 for result in reference), "the search should reach tied heads"
    # Batches of several sizes put the tied variants in different rows of different passes.
    for forward_batch_size in (1, 3, 64):
        config = HackAttendConfig(alpha=0.01, forward_batch_size=forward_batch_size, query_batch_size=3)
        _assert_same_decisions(HackAttendSearch(wrapped, config).attack_many(examples), reference, examples)


def test_decoder_without_pad_token_runs():
    model = build_tiny_model("gpt2", num_labels=3)
    model.config.pad_token_id = None  # as in the released GPT-2 checkpoints
    wrapped = AttentionMaskedModel(model)
    batch = make_batch("gpt2", lengths=(9, 9, 9))
    rows = [{name: batch[name][row : row + 1] for name in ("input_ids", "attention_mask")} for row in range(3)]
    examples = [(inputs, int(predict(wrapped, inputs)[0].argmax()), str(row)) for row, inputs in enumerate(rows)]
    config = HackAttendConfig(alpha=0.3)
    fast = HackAttendSearch(wrapped, config).attack_many(examples)
    sequential = SequentialHackAttendSearch(wrapped, config)
    _assert_same_decisions(fast, [sequential.attack(*example) for example in examples], examples)


def test_invalid_search_inputs_rejected(wrapped_bert):
    (inputs, label, key), = _examples(wrapped_bert, 1)
    search = HackAttendSearch(wrapped_bert, HackAttendConfig())
    with pytest.raises(ValueError, match="contain 'labels'"):
        search.attack_many([({**inputs, "labels": torch.tensor([label])}, label, key)])
    with pytest.raises(ValueError, match=r"have the keys \['input_ids'\], but the search needs"):
        search.attack_many([({"input_ids": inputs["input_ids"]}, label, key)])
