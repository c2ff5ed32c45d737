"""`HackAttendEvaluator` and the `attack` command on real SST-2 and DREAM rows with tiny victims."""

from __future__ import annotations

import json
import statistics

import datasets
import pytest
import torch
from hackattend_support import flippy_bert, minilm_tokenizer

from attend_robust.cli import main as cli_main
from attend_robust.data import load_task_dataset
from attend_robust.hackattend import HackAttendConfig
from attend_robust.hackattend.evaluator import HackAttendEvaluator
from attend_robust.hackattend.records import AttackRecord, read_records

ALPHA = 0.2


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


@pytest.fixture
def sst2_sample(shared_data):
    return load_task_dataset("sst2", "dev", data_dir=shared_data, limit=14)


@pytest.fixture
def victim(tokenizer):
    return flippy_bert(tokenizer.vocab_size)


def _without_seconds(records):
    return [{**record.to_dict(), "seconds": None} for record in records]


def _classification_dataset(texts, labels):
    features = datasets.Features({
        "example_id": datasets.Value("string"),
        "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["negative", "positive"]),
    })
    return datasets.Dataset.from_dict(
        {"example_id": [f"row-{i}" for i in range(len(texts))], "text": texts, "label": labels}, features=features
    )


def test_report_matches_records(victim, tokenizer, sst2_sample, tmp_path):
    evaluator = HackAttendEvaluator(victim, tokenizer, HackAttendConfig(alpha=ALPHA), output_dir=tmp_path,
                                    progress=False)
    report = evaluator.evaluate(sst2_sample)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert HackAttendConfig.load(tmp_path / "config.json") == evaluator.config

    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["index"] for record in records] == list(range(14))
    attacked = [r for r in records if r["status"] in ("success", "failure")]
    successes = [r for r in records if r["status"] == "success"]
    failures = [r for r in records if r["status"] == "failure"]
    assert 0 < len(successes) < len(attacked), "the victim should give both outcomes"

    assert report["clean_accuracy"] == pytest.approx(len(attacked) / 14)
    assert report["robust_accuracy"] == pytest.approx(len(failures) / 14)
    assert report["attack_success_rate"] == pytest.approx(len(successes) / len(attacked))
    assert report["mean_queries"] == pytest.approx(sum(r["queries"] for r in attacked) / len(attacked))
    assert report["median_queries"] == statistics.median(r["queries"] for r in attacked)
    hamming = [sum(len(group[3]) // 2 for group in r["mask"]) / len(r["mask"]) for r in successes]
    assert report["mean_hamming"] == pytest.approx(sum(hamming) / len(hamming))
    fractions = [r["num_masked_units"] / r["candidate_units"] for r in successes]
    assert report["masked_fraction"] == pytest.approx(sum(fractions) / len(fractions))
    by_layer = [0, 0]
    for r in successes:
        by_layer[r["perturbed_heads"][-1][0]] += 1
    assert report["successes_by_layer"] == by_layer
    assert sum(map(sum, report["successes_by_head"])) == len(successes)
    assert report["skipped"] == 0


def test_resume_after_interruption(victim, tokenizer, sst2_sample, tmp_path, caplog):
    config = HackAttendConfig(alpha=ALPHA)
    reference = HackAttendEvaluator(victim, tokenizer, config, output_dir=tmp_path / "whole", progress=False)
    reference.evaluate(sst2_sample)

    interrupted = HackAttendEvaluator(victim, tokenizer, config, output_dir=tmp_path / "cut", progress=False)
    real_attack = interrupted.search.attack_many
    calls = []

    def attack_then_die(examples):
        if len(calls) >= 5:
            raise KeyboardInterrupt
        calls.extend(key for _, _, key in examples)
        return real_attack(examples)

    interrupted.search.attack_many = attack_then_die
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING", logger="attend_robust.hackattend.evaluator"):
        interrupted.evaluate(sst2_sample)
    assert f"Interrupted: {len(calls)} of 14 examples have records in {tmp_path / 'cut'}" in caplog.text
    part = tmp_path / "cut" / "records.part-0.jsonl"
    assert len(part.read_text().splitlines()) >= 5
    # A kill in the middle of a write leaves half a line behind.
    with part.open("a") as handle:
        handle.write('{"example_id": "half a rec')

    resumed = HackAttendEvaluator(victim, tokenizer, config, output_dir=tmp_path / "cut", progress=False)
    resumed_calls = []
    real_resumed = resumed.search.attack_many

    def counting_attack(examples):
        resumed_calls.extend(key for _, _, key in examples)
        return real_resumed(examples)

    resumed.search.attack_many = counting_attack
    report = resumed.evaluate(sst2_sample)

    assert set(calls).isdisjoint(resumed_calls), "no example is attacked twice"
    records = read_records(tmp_path / "cut" / "records.jsonl")
    assert len(records) == 14
    assert _without_seconds(records) == _without_seconds(reference.records)
    assert not list((tmp_path / "cut").glob("records.part-*"))
    assert report["attack_success_rate"] == reference.build_report(reference.records)["attack_success_rate"]


def test_output_dir_with_other_settings_is_rejected(victim, tokenizer, sst2_sample, tmp_path):
    HackAttendEvaluator(victim, tokenizer, HackAttendConfig(alpha=ALPHA), output_dir=tmp_path,
                        progress=False).evaluate(sst2_sample.select(range(2)))
    other = HackAttendEvaluator(victim, tokenizer, HackAttendConfig(alpha=0.1), output_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="alpha: saved 0.2, now 0.1"):
        other.evaluate(sst2_sample.select(range(2)))
    same_settings = HackAttendEvaluator(victim, tokenizer, HackAttendConfig(alpha=ALPHA), output_dir=tmp_path,
                                        progress=False)
    with pytest.raises(ValueError, match="different dataset"):
        same_settings.evaluate(sst2_sample.select(range(3)))


def test_bad_rows_are_skipped_or_counted(victim, tokenizer):
    long_text = " ".join(["wonderful"] * 300)
    dataset = _classification_dataset(["a fine film", "   ", long_text, "dull and flat", "no label here"],
                                      [1, 0, 1, 0, -1])
    evaluator = HackAttendEvaluator(victim, tokenizer, HackAttendConfig(alpha=ALPHA), progress=False)
    report = evaluator.evaluate(dataset)
    assert report["skipped_by_reason"] == {"empty-input": 1, "label-out-of-range": 1}
    assert report["evaluated"] == 3
    assert report["truncated"] == 1
    statuses = {record.example_id: record.status for record in evaluator.records}
    assert statuses["row-1"] == "skipped"
    assert statuses["row-4"] == "skipped"
    truncated = next(record for record in evaluator.records if record.example_id == "row-2")
    assert truncated.num_tokens == [128]


def test_label_count_mismatch_is_rejected(tokenizer, sst2_sample):
    evaluator = HackAttendEvaluator(flippy_bert(tokenizer.vocab_size, num_labels=3), tokenizer, progress=False)
    with pytest.raises(ValueError, match="num_labels=3, but the dataset has 2 classes"):
        evaluator.evaluate(sst2_sample)


def test_training_mode_model_is_evaluated_in_eval_mode(victim, tokenizer):
    victim.train()
    with pytest.warns(UserWarning, match="training mode"):
        evaluator = HackAttendEvaluator(victim, tokenizer, progress=False)
    assert not evaluator.wrapped.model.training


def test_unsupported_architecture_is_rejected(tokenizer):
    from transformers import FunnelConfig, FunnelForSequenceClassification

    model = FunnelForSequenceClassification(FunnelConfig(vocab_size=50, d_model=32, n_head=2, d_head=16,
                                                         d_inner=37, block_sizes=[1, 1]))
    with pytest.raises(ValueError, match="not supported by attend_robust"):
        HackAttendEvaluator(model, tokenizer, progress=False)


def test_wrong_model_head_is_rejected(tokenizer, sst2_sample):
    evaluator = HackAttendEvaluator(flippy_bert(tokenizer.vocab_size, multiple_choice=True), tokenizer,
                                    progress=False)
    with pytest.raises(ValueError, match="AutoModelForSequenceClassification"):
        evaluator.evaluate(sst2_sample)


def test_multiple_choice_dream(tokenizer, shared_data, tmp_path):
    dataset = load_task_dataset("dream", "dev", data_dir=shared_data, limit=6)
    model = flippy_bert(tokenizer.vocab_size, multiple_choice=True)
    evaluator = HackAttendEvaluator(model, tokenizer, HackAttendConfig(alpha=0.05, max_heads=2),
                                    output_dir=tmp_path, progress=False)
    report = evaluator.evaluate(dataset)
    assert report["examples"] == 6
    assert report["clean_correct"] == report["successes"] + report["failures"]
    for record in evaluator.records:
        assert len(record.num_tokens) == 3
        if record.attacked:
            assert {group[0] for group in record.mask} == {0, 1, 2}, "each choice has its own perturbed matrices"
            assert evaluator.replay(record, dataset).reproduced


def test_attack_command_prints_and_writes_report(victim, tokenizer, shared_data, tmp_path, capsys):
    model_dir = tmp_path / "victim"
    victim.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    output_dir = tmp_path / "attack"
    code = cli_main([
        "attack", "--model", str(model_dir), "--dataset", "sst2", "--split", "dev", "--data-dir", str(shared_data),
        "--limit", "4", "--alpha", "0.2", "--max-layers", "1", "--max-heads", "2", "--output-dir", str(output_dir),
        "--no-progress",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "attack success rate" in printed
    report = json.loads((output_dir / "report.json").read_text())
    assert report["examples"] == 4
    assert report["config"]["max_layers"] == 1
    assert report["config"]["max_heads"] == 2
    assert all(record.queries <= 2 for record in read_records(output_dir / "records.jsonl"))


def test_attack_command_records_interrupted_time(victim, tokenizer, shared_data, tmp_path, monkeypatch):
    model_dir = tmp_path / "victim"
    victim.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    def interrupted(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(HackAttendEvaluator, "_attack_positions", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli_main(["attack", "--model", str(model_dir), "--dataset", "sst2", "--data-dir", str(shared_data),
                  "--limit", "2", "--output-dir", str(tmp_path / "out"), "--no-progress"])
    (timing,) = json.loads((tmp_path / "out" / "wall_time.json").read_text())
    assert timing["interrupted"] is True
    assert timing["processes"] == 1


def test_attack_command_rejects_caps_beyond_model(victim, tokenizer, shared_data, tmp_path):
    model_dir = tmp_path / "victim"
    victim.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(ValueError, match="max_layers=12 exceeds the model, which has 2"):
        cli_main(["attack", "--model", str(model_dir), "--dataset", "sst2", "--data-dir", str(shared_data),
                  "--limit", "2", "--max-layers", "12", "--output-dir", str(tmp_path / "out"), "--no-progress"])


def test_records_do_not_depend_on_batch_sizes(victim, tokenizer, sst2_sample):
    small = HackAttendEvaluator(victim, tokenizer, HackAttendConfig(
        alpha=ALPHA, query_batch_size=1, example_batch_size=1, forward_batch_size=1), progress=False)
    large = HackAttendEvaluator(victim, tokenizer, HackAttendConfig(
        alpha=ALPHA, query_batch_size=32, example_batch_size=16, forward_batch_size=32), progress=False)
    small.evaluate(sst2_sample)
    large.evaluate(sst2_sample)
    # Probabilities may differ in the last float digits between batch sizes.
    for name in ("clean_confidence", "adversarial_confidence"):
        assert [getattr(record, name) or 0.0 for record in small.records] == pytest.approx(
            [getattr(record, name) or 0.0 for record in large.records], rel=1e-5
        )
    # One query per pass wastes nothing after a success; larger query batches may.
    for first, second in zip(small.records, large.records):
        assert first.layer_evaluations <= second.layer_evaluations
    for record in small.records + large.records:
        record.clean_confidence = record.adversarial_confidence = None
        record.layer_evaluations = 0
    assert _without_seconds(small.records) == _without_seconds(large.records)
    assert all(isinstance(record, AttackRecord) for record in small.records)
    assert torch.is_grad_enabled()
