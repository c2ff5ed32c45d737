"""Per-example records: JSON round trip, JSONL files cut by a kill, and replay of the mask."""

from __future__ import annotations

import json

import pytest
import torch
from hackattend_support import flippy_bert, predict, random_examples

from attend_robust import AttentionMaskedModel
from attend_robust.hackattend import HackAttendConfig, HackAttendSearch
from attend_robust.hackattend.records import AttackRecord, group_units, read_records, replay, write_record


def _sample_record(**overrides) -> AttackRecord:
    values = dict(
        example_id="dev-7", index=7, label=1, status="success", clean_prediction=1, clean_confidence=0.91,
        queries=3, model_evaluations=22, perturbed_heads=[[1, 2], [1, 0], [0, 3]],
        mask=group_units([(0, 1, 2, 1, 4), (0, 1, 2, 3, 1), (0, 1, 0, 2, 2), (0, 0, 3, 5, 5)]),
        num_masked_units=4, num_perturbed_matrices=3, candidate_units=90, hamming=4 / 3, ranking_fallbacks=1,
        adversarial_prediction=0, adversarial_confidence=0.55, num_tokens=[6], truncated=False, seconds=0.25,
    )
    values.update(overrides)
    return AttackRecord(**values)


def test_record_json_round_trip():
    record = _sample_record()
    assert AttackRecord.from_json(record.to_json()) == record


def test_record_ignores_unknown_keys():
    values = json.loads(_sample_record().to_json())
    values["added_by_a_later_version"] = 1
    assert AttackRecord.from_dict(values) == _sample_record()


def test_units_expand_grouped_mask():
    record = _sample_record()
    assert record.units() == [(0, 1, 2, 1, 4), (0, 1, 2, 3, 1), (0, 1, 0, 2, 2), (0, 0, 3, 5, 5)]
    assert record.mask[0] == [0, 1, 2, [1, 4, 3, 1]]


def test_read_records_drops_partial_last_line(tmp_path):
    path = tmp_path / "records.jsonl"
    with path.open("w") as handle:
        write_record(handle, _sample_record(example_id="a", index=0))
        write_record(handle, _sample_record(example_id="b", index=1))
        handle.write(_sample_record(example_id="c", index=2).to_json()[:40])
    assert [record.example_id for record in read_records(path)] == ["a", "b"]
    read_records(path, repair=True)
    assert path.read_text().endswith("\n")
    assert len(path.read_text().splitlines()) == 2


def test_read_records_rejects_corrupt_middle_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(_sample_record().to_json() + "\n{not json\n" + _sample_record().to_json() + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_records(path)


def test_replay_reproduces_flipped_prediction():
    model = flippy_bert()
    wrapped = AttentionMaskedModel(model)
    search = HackAttendSearch(wrapped, HackAttendConfig(alpha=0.2))
    replayed = 0
    for inputs, key in random_examples(10):
        label = int(predict(wrapped, inputs)[0].argmax())
        result = search.attack(inputs, label, key)
        record = AttackRecord.from_search(result, example_id=key, index=0, label=label, num_tokens=[0],
                                          truncated=False)
        record = AttackRecord.from_json(record.to_json())
        outcome = replay(record, wrapped, inputs)
        assert outcome.reproduced, key
        if record.success:
            assert outcome.prediction != label
            replayed += 1
    assert replayed > 0


def test_replay_wraps_plain_model_and_restores_it():
    model = flippy_bert()
    inputs, key = next(random_examples(1))
    with torch.no_grad():
        before = model(**inputs).logits
    wrapped = AttentionMaskedModel(model)
    label = int(predict(wrapped, inputs)[0].argmax())
    result = HackAttendSearch(wrapped, HackAttendConfig(alpha=0.2)).attack(inputs, label, key)
    wrapped.unwrap()
    record = AttackRecord.from_search(result, example_id=key, index=0, label=label, num_tokens=[0], truncated=False)
    assert replay(record, model, inputs).reproduced
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_replay_rejects_unattacked_record():
    with pytest.raises(ValueError, match="only attacked examples"):
        replay(_sample_record(status="misclassified"), flippy_bert(), {})
