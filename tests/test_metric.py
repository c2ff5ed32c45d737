"""Tests of the bundled `hackattend` evaluate metric: loading offline, values, batching, docs."""

from __future__ import annotations

import doctest
import importlib.util
import inspect
import math
import random
import re
import socket
from pathlib import Path

import evaluate
import pytest

from attend_robust.metrics import METRIC_NAMES, load_metric, metric_path

METRIC_DIR = Path(__file__).resolve().parents[1] / "attend_robust" / "metrics" / "hackattend"

BASE_KEYS = ["clean_accuracy", "robust_accuracy", "attack_success_rate", "num_examples", "num_attacked", "num_successes"]
COST_KEYS = ["mean_queries", "mean_hamming_distance"]

# A local stand-in for the Hub's `accuracy` metric, which `evaluate.load("accuracy")` can only
# fetch from the Hub. Its `_compute` has the same signature as the Hub module's.
LOCAL_ACCURACY_SCRIPT = '''
import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of correct predictions.",
            citation="",
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references) if normalize else float(correct)}
'''


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Put evaluate and huggingface_hub in offline mode and refuse every network connection.

    Each test also gets its own metric cache folder. A `_compute` that raises leaves its cache
    file locked, and the next metric with the same cache folder then waits 1 s for that lock.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    # evaluate reads these two settings once, at import.
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", tmp_path / "metrics-cache")

    original_connect = socket.socket.connect

    def connect_locally_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"test_metric runs offline, but a connection to {address!r} was attempted")
        return original_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect_locally_only)


def _module_from_file():
    """Import hackattend.py directly from the package folder, as `doctest` needs a module object."""
    spec = importlib.util.spec_from_file_location("hackattend_metric_script", METRIC_DIR / "hackattend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------- loading


def test_evaluate_load_folder_offline():
    metric = evaluate.load(str(METRIC_DIR))

    assert metric.name == "hackattend"
    assert set(metric.features) == {"references", "predictions", "adversarial_predictions"}
    results = metric.compute(references=[1, 0], predictions=[1, 0], adversarial_predictions=[0, 0])
    assert results["attack_success_rate"] == 0.5


def test_evaluate_load_script_file_offline():
    # The Space's app.py loads the script by its file path, whatever the Space's folder is called.
    metric = evaluate.load(str(METRIC_DIR / "hackattend.py"), config_name="with_costs")

    assert metric.name == "hackattend"
    assert "queries" in metric.features


def test_load_metric_helper():
    assert METRIC_NAMES == ("hackattend",)
    assert metric_path("hackattend") == METRIC_DIR

    default = load_metric("hackattend")
    with_costs = load_metric("hackattend", config_name="with_costs")

    assert default.config_name == "default"
    assert with_costs.config_name == "with_costs"
    assert set(with_costs.features) == {
        "references", "predictions", "adversarial_predictions", "queries", "hamming_distances"
    }


def test_load_metric_unknown_name():
    with pytest.raises(ValueError, match="Unknown metric 'hackatend'.*hackattend"):
        load_metric("hackatend")


def test_unknown_configuration():
    with pytest.raises(ValueError, match="Unknown configuration 'costs'.*'with_costs'"):
        load_metric("hackattend", config_name="costs")


def test_metric_info_texts():
    metric = load_metric("hackattend")

    assert "Liong" in metric.citation
    assert "attack_success_rate" in metric.description
    assert "Examples:" in metric.inputs_description


def test_compute_has_no_var_keyword():
    metric = load_metric("hackattend")
    kinds = {parameter.kind for parameter in inspect.signature(type(metric)._compute).parameters.values()}

    assert inspect.Parameter.VAR_KEYWORD not in kinds
    assert inspect.Parameter.VAR_POSITIONAL not in kinds


# ----------------------------------------------------------------------------------------- values

# Each case: inputs and the expected outputs, worked out by hand from the definitions
# (clean = correct / n, robust = correct and still correct under attack / n, ASR = successes /
# correct, mean queries over correct examples, mean Hamming distance over successes).
CASES = [
    pytest.param(
        dict(
            references=[1, 0, 1, 1, 0],
            predictions=[1, 0, 1, 0, 0],
            adversarial_predictions=[0, 0, 0, 0, 1],
            queries=[4, 12, 1, None, 7],
            hamming_distances=[2.0, 0.0, 3.0, None, 1.0],
        ),
        dict(clean_accuracy=0.8, robust_accuracy=0.2, attack_success_rate=0.75, num_examples=5,
             num_attacked=4, num_successes=3, mean_queries=6.0, mean_hamming_distance=2.0),
        id="binary-one-misclassified",
    ),
    pytest.param(
        dict(
            references=[0, 1, 2],
            predictions=[0, 1, 2],
            adversarial_predictions=[0, 1, 2],
            queries=[5, 6, 7],
            hamming_distances=[None, None, None],
        ),
        dict(clean_accuracy=1.0, robust_accuracy=1.0, attack_success_rate=0.0, num_examples=3,
             num_attacked=3, num_successes=0, mean_queries=6.0, mean_hamming_distance=0.0),
        id="every-attack-fails",
    ),
    pytest.param(
        dict(
            references=[1, 1],
            predictions=[1, 1],
            adversarial_predictions=[0, 0],
            queries=[1, 3],
            hamming_distances=[9.0, 0.5],
        ),
        dict(clean_accuracy=1.0, robust_accuracy=0.0, attack_success_rate=1.0, num_examples=2,
             num_attacked=2, num_successes=2, mean_queries=2.0, mean_hamming_distance=4.75),
        id="every-attack-succeeds",
    ),
    pytest.param(
        dict(
            references=[0, 1],
            predictions=[1, 0],
            adversarial_predictions=[None, 1],
            queries=[None, None],
            hamming_distances=[None, None],
        ),
        dict(clean_accuracy=0.0, robust_accuracy=0.0, attack_success_rate=0.0, num_examples=2,
             num_attacked=0, num_successes=0, mean_queries=0.0, mean_hamming_distance=0.0),
        id="nothing-attacked",
    ),
    pytest.param(
        # Example 0 was wrong on clean input. Its adversarial prediction equals the reference
        # by mistake, which must not make it count as robust.
        dict(
            references=[1, 0],
            predictions=[0, 0],
            adversarial_predictions=[1, 0],
            queries=[0, 3],
            hamming_distances=[0.0, 0.0],
        ),
        dict(clean_accuracy=0.5, robust_accuracy=0.5, attack_success_rate=0.0, num_examples=2,
             num_attacked=1, num_successes=0, mean_queries=3.0, mean_hamming_distance=0.0),
        id="misclassified-adversarial-ignored",
    ),
    pytest.param(
        # Four-choice multiple choice: examples 0, 1 and 2 are attacked, and 0 and 2 flip.
        dict(
            references=[3, 0, 2, 1],
            predictions=[3, 0, 2, 2],
            adversarial_predictions=[1, 0, 3, 2],
            queries=[10, 144, 3, 0],
            hamming_distances=[4.5, 100.0, 1.5, None],
        ),
        dict(clean_accuracy=0.75, robust_accuracy=0.25, attack_success_rate=2 / 3, num_examples=4,
             num_attacked=3, num_successes=2, mean_queries=157 / 3, mean_hamming_distance=3.0),
        id="multiple-choice",
    ),
    pytest.param(
        dict(references=[2], predictions=[2], adversarial_predictions=[0], queries=[1], hamming_distances=[1.0]),
        dict(clean_accuracy=1.0, robust_accuracy=0.0, attack_success_rate=1.0, num_examples=1,
             num_attacked=1, num_successes=1, mean_queries=1.0, mean_hamming_distance=1.0),
        id="single-example",
    ),
]


@pytest.mark.parametrize("inputs, expected", CASES)
def test_values_with_costs(inputs, expected):
    results = load_metric("hackattend", config_name="with_costs").compute(**inputs)

    assert list(results) == BASE_KEYS + COST_KEYS
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-12), key
    for key in BASE_KEYS[3:]:
        assert type(results[key]) is int, key
    for key in BASE_KEYS[:3] + COST_KEYS:
        assert type(results[key]) is float, key


@pytest.mark.parametrize("inputs, expected", CASES)
def test_values_default_configuration(inputs, expected):
    columns = {key: inputs[key] for key in ("references", "predictions", "adversarial_predictions")}

    results = load_metric("hackattend").compute(**columns)

    assert list(results) == BASE_KEYS
    for key in BASE_KEYS:
        assert results[key] == pytest.approx(expected[key], abs=1e-12), key


def _random_table(size: int, seed: int) -> dict[str, list]:
    generator = random.Random(seed)
    references = [generator.randrange(3) for _ in range(size)]
    predictions = [label if generator.random() < 0.7 else (label + 1) % 3 for label in references]
    adversarial = [
        prediction if generator.random() < 0.5 else generator.randrange(3) for prediction in predictions
    ]
    return {
        "references": references,
        "predictions": predictions,
        "adversarial_predictions": adversarial,
        "queries": [generator.randrange(1, 145) for _ in range(size)],
        "hamming_distances": [round(generator.uniform(1.0, 50.0), 3) for _ in range(size)],
    }


def test_robust_accuracy_identity_on_random_tables():
    metric = load_metric("hackattend", config_name="with_costs")
    for seed in range(5):
        results = metric.compute(**_random_table(40, seed))

        assert results["robust_accuracy"] == pytest.approx(
            results["clean_accuracy"] * (1 - results["attack_success_rate"])
        )
        for key in BASE_KEYS[:3]:
            assert 0.0 <= results[key] <= 1.0, key
        for value in results.values():
            assert not math.isnan(value)


def test_add_batch_equals_one_compute():
    table = _random_table(50, seed=7)
    whole = load_metric("hackattend", config_name="with_costs").compute(**table)

    batched = load_metric("hackattend", config_name="with_costs")
    start = 0
    for size in (1, 7, 0, 20, 22):
        batched.add_batch(**{key: values[start : start + size] for key, values in table.items()})
        start += size
    assert start == 50

    one_by_one = load_metric("hackattend", config_name="with_costs")
    for index in range(50):
        one_by_one.add(
            reference=table["references"][index],
            prediction=table["predictions"][index],
            adversarial_predictions=table["adversarial_predictions"][index],
            queries=table["queries"][index],
            hamming_distances=table["hamming_distances"][index],
        )

    assert batched.compute() == whole
    assert one_by_one.compute() == whole


# ----------------------------------------------------------------------------------------- errors


def test_empty_input_raises():
    with pytest.raises(ValueError, match="no examples"):
        load_metric("hackattend").compute(references=[], predictions=[], adversarial_predictions=[])


def test_costs_in_default_configuration_raise():
    with pytest.raises(ValueError, match="config_name='with_costs'"):
        load_metric("hackattend").compute(
            references=[1], predictions=[1], adversarial_predictions=[0], queries=[3]
        )


def test_missing_prediction_raises():
    with pytest.raises(ValueError, match=r"predictions\[1\] is missing"):
        load_metric("hackattend").compute(
            references=[1, 0], predictions=[1, None], adversarial_predictions=[1, 0]
        )


def test_missing_adversarial_prediction_of_attacked_example_raises():
    with pytest.raises(ValueError, match=r"adversarial_predictions\[0\] is missing"):
        load_metric("hackattend").compute(references=[1], predictions=[1], adversarial_predictions=[None])


@pytest.mark.parametrize(
    "queries, hamming_distances, message",
    [
        ([None, 2], [1.0, 1.0], r"queries\[0\] is missing"),
        ([3, -1], [1.0, 1.0], r"queries\[1\] = -1 is invalid"),
        ([3, 2], [float("nan"), 1.0], r"hamming_distances\[0\] = nan is invalid"),
        ([3, 2], [float("inf"), 1.0], r"hamming_distances\[0\] = inf is invalid"),
        ([3, 2], [None, 1.0], r"hamming_distances\[0\] is missing"),
        ([3, 2], [-0.5, 1.0], r"hamming_distances\[0\] = -0.5 is invalid"),
    ],
)
def test_invalid_counted_costs_raise(queries, hamming_distances, message):
    # Both examples are attacked. Example 0 succeeds and example 1 fails.
    metric = load_metric("hackattend", config_name="with_costs")
    with pytest.raises(ValueError, match=message):
        metric.compute(
            references=[1, 0],
            predictions=[1, 0],
            adversarial_predictions=[0, 0],
            queries=queries,
            hamming_distances=hamming_distances,
        )


def test_invalid_uncounted_costs_are_ignored():
    # Example 1 failed, so its Hamming distance is not counted, even when it is NaN.
    results = load_metric("hackattend", config_name="with_costs").compute(
        references=[1, 0],
        predictions=[1, 0],
        adversarial_predictions=[0, 0],
        queries=[3, 2],
        hamming_distances=[1.0, float("nan")],
    )

    assert results["mean_hamming_distance"] == 1.0


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="Mismatch in the number"):
        load_metric("hackattend").compute(references=[1, 0], predictions=[1], adversarial_predictions=[1, 0])


# ---------------------------------------------------------------------------------------- combine


def _local_accuracy(tmp_path: Path) -> evaluate.EvaluationModule:
    folder = tmp_path / "accuracy"
    folder.mkdir()
    (folder / "accuracy.py").write_text(LOCAL_ACCURACY_SCRIPT, encoding="utf-8")
    return evaluate.load(str(folder))


def test_combine_with_accuracy(tmp_path):
    combined = evaluate.combine([load_metric("hackattend"), _local_accuracy(tmp_path)])

    combined.add_batch(references=[1, 0, 1], predictions=[1, 0, 1], adversarial_predictions=[0, 0, 1])
    combined.add_batch(references=[1, 0], predictions=[0, 0], adversarial_predictions=[0, 1])
    results = combined.compute()

    assert results["accuracy"] == pytest.approx(0.8)
    assert results["clean_accuracy"] == pytest.approx(0.8)
    assert results["robust_accuracy"] == pytest.approx(0.4)
    assert results["attack_success_rate"] == pytest.approx(0.5)


def test_combine_compute_with_extra_columns_fails(tmp_path):
    # evaluate 0.4.6 forwards every keyword of CombinedEvaluations.compute to every module, and
    # accuracy has no adversarial_predictions argument. The metric card documents this, so if this
    # test starts failing, evaluate changed and the card should be updated.
    combined = evaluate.combine([load_metric("hackattend"), _local_accuracy(tmp_path)])

    with pytest.raises(TypeError, match="adversarial_predictions"):
        combined.compute(references=[1, 0], predictions=[1, 0], adversarial_predictions=[0, 0])


# ------------------------------------------------------------------------------------------- docs


def test_module_doctests():
    module = _module_from_file()

    results = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)

    assert results.attempted >= 10
    assert results.failed == 0


def test_module_constants():
    module = _module_from_file()

    for name in ("_DESCRIPTION", "_KWARGS_DESCRIPTION", "_CITATION"):
        assert isinstance(getattr(module, name), str) and getattr(module, name).strip(), name
    assert module.__doc__ and module.__doc__.strip()
    assert issubclass(module.Hackattend, evaluate.Metric)


def test_card_examples_run():
    """Run the `>>>` examples of README.md in order, sharing one namespace like a reader's session."""
    text = (METRIC_DIR / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    doctest_blocks = [block for block in blocks if ">>>" in block]
    assert len(doctest_blocks) >= 4

    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    namespace: dict = {}
    for number, block in enumerate(doctest_blocks):
        test = parser.get_doctest(block, namespace, f"README.md block {number}", str(METRIC_DIR / "README.md"), 0)
        runner.run(test, clear_globs=False)
        namespace = test.globs  # DocTest copies its globals, so carry the names into the next block
    assert runner.failures == 0


def test_card_metadata():
    text = (METRIC_DIR / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "README.md must start with YAML front matter"
    import yaml

    metadata = yaml.safe_load(match.group(1))

    for key in ("title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "app_file", "pinned", "tags"):
        assert key in metadata, key
    assert metadata["sdk"] == "gradio"
    assert metadata["app_file"] == "app.py"
    assert {"evaluate", "metric"} <= set(metadata["tags"])
    for section in ("## Metric Description", "## How to Use", "### Inputs", "### Output Values",
                    "### Examples", "## Limitations and Bias", "## Citation"):
        assert section in text, section


def test_space_files_present():
    for name in ("hackattend.py", "README.md", "app.py", "requirements.txt"):
        assert (METRIC_DIR / name).is_file(), name
    app = (METRIC_DIR / "app.py").read_text(encoding="utf-8")
    assert "launch_gradio_widget" in app
    requirements = (METRIC_DIR / "requirements.txt").read_text(encoding="utf-8")
    assert "evaluate" in requirements
