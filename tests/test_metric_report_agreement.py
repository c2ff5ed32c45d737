"""The HackAttend report and the `hackattend` metric agree on the same records."""

from __future__ import annotations

import json

import pytest
from hackattend_support import flippy_bert, minilm_tokenizer

from attend_robust import load_metric
from attend_robust.data import load_task_dataset
from attend_robust.hackattend import HackAttendConfig
from attend_robust.hackattend.evaluator import HackAttendEvaluator
from attend_robust.metrics import metric_inputs_from_records


@pytest.mark.parametrize("alpha", [0.02, 0.3])
def test_report_and_metric_agree(alpha, shared_data, tmp_path):
    tokenizer = minilm_tokenizer()
    dataset = load_task_dataset("sst2", "dev", data_dir=shared_data, limit=16)
    evaluator = HackAttendEvaluator(flippy_bert(tokenizer.vocab_size), tokenizer, HackAttendConfig(alpha=alpha),
                                    output_dir=tmp_path, progress=False)
    report = evaluator.evaluate(dataset)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    inputs = metric_inputs_from_records(json.loads(line) for line in lines)

    metric = load_metric("hackattend", config_name="with_costs")
    result = metric.compute(**inputs)

    assert result["clean_accuracy"] == pytest.approx(report["clean_accuracy"])
    assert result["robust_accuracy"] == pytest.approx(report["robust_accuracy"])
    assert result["attack_success_rate"] == pytest.approx(report["attack_success_rate"] or 0.0)
    assert result["mean_queries"] == pytest.approx(report["mean_queries"] or 0.0)
    assert result["mean_hamming_distance"] == pytest.approx(report["mean_hamming"] or 0.0)
    assert result["num_attacked"] == report["clean_correct"]
    assert result["num_successes"] == report["successes"]
