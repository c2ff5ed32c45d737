"""HackAttend robustness metric: clean and robust accuracy, attack success rate and attack costs.

An `evaluate` metric module. It works from per-example results that an attack on self-attention
already produced (gold label, clean prediction, prediction under the adversarial attention mask and,
optionally, queries and Hamming distance), so it runs no model and needs no attend-robust install.
The definitions follow Section 4.1 of Liong et al., "Unveiling Vulnerability of Self-Attention"
(LREC-COLING 2024).
"""

from __future__ import annotations

import math

import datasets
import evaluate

_CITATION = """\
@inproceedings{liong-etal-2024-unveiling,
  title     = {Unveiling Vulnerability of Self-Attention},
  author    = {Liong, Khai Jiet and Wu, Hongqiu and Zhao, Hai and Li, Xiaoshan and Bian, Minjie},
  booktitle = {Proceedings of LREC-COLING 2024},
  year      = {2024}
}
"""

_DESCRIPTION = """\
Robustness of a classifier under an attack on its self-attention, such as HackAttend, which masks
a few attention units until the prediction changes. Only examples whose clean prediction is correct
are attacked, and an example that is already wrong counts as wrong under attack.

- clean_accuracy = correct clean predictions / examples
- robust_accuracy = examples still correct under attack / examples
- attack_success_rate = successful attacks / correct clean predictions
- mean_queries (configuration "with_costs"): mean queries over attacked examples
- mean_hamming_distance (configuration "with_costs"): mean Hamming distance over successful attacks
"""

_KWARGS_DESCRIPTION = """
Computes HackAttend robustness figures from per-example attack results.

Configurations (the `config_name` argument of `evaluate.load`):
    "default": the inputs `references`, `predictions` and `adversarial_predictions`.
    "with_costs": also `queries` and `hamming_distances`, and the outputs `mean_queries` and
        `mean_hamming_distance`.

Args:
    references (`list` of `int`): gold labels. For multiple choice, the index of the correct choice.
    predictions (`list` of `int`): predictions on the clean input, with the unperturbed attention mask.
    adversarial_predictions (`list` of `int`): predictions under the adversarial attention mask.
        An example whose clean prediction is wrong is not attacked. Pass its clean prediction (or
        None) here. The value is not used, and such examples always count as wrong under attack.
    queries (`list` of `int`, "with_costs" only): model evaluations with a perturbed attention mask
        that the attack spent on each example, until success or give-up. Only attacked examples
        (correct clean prediction) are counted. The values of other examples are ignored and may
        be None.
    hamming_distances (`list` of `float`, "with_costs" only): for each example, the number of
        attention units that differ between the clean and the adversarial mask, summed over the
        perturbed attention matrices and divided by their number. Only successful attacks are
        counted. The values of other examples are ignored and may be None.

Returns:
    clean_accuracy (`float`): correct clean predictions / examples, in [0, 1].
    robust_accuracy (`float`): examples whose clean and adversarial predictions both equal the
        reference / examples, in [0, 1]. It equals clean_accuracy * (1 - attack_success_rate).
    attack_success_rate (`float`): successful attacks / attacked examples, in [0, 1]. A successful
        attack is an attacked example whose adversarial prediction differs from the reference.
        0.0 when no example was attacked (`num_attacked` is 0).
    num_examples (`int`): number of examples.
    num_attacked (`int`): examples with a correct clean prediction, which the attack targets.
    num_successes (`int`): successful attacks.
    mean_queries (`float`, "with_costs" only): mean of `queries` over attacked examples (successes
        and give-ups). 0.0 when `num_attacked` is 0.
    mean_hamming_distance (`float`, "with_costs" only): mean of `hamming_distances` over successful
        attacks. 0.0 when `num_successes` is 0.

    No output is ever NaN: a rate or mean with an empty denominator is 0.0, and the count fields
    above tell such a 0.0 apart from a measured one. An empty input raises `ValueError`.

Examples:
    Five examples. The clean prediction of the fourth is wrong, so it is not attacked, and three
    of the four attacks succeed.

    >>> from attend_robust.metrics import load_metric
    >>> hackattend = load_metric("hackattend")
    >>> results = hackattend.compute(
    ...     references=[1, 0, 1, 1, 0],
    ...     predictions=[1, 0, 1, 0, 0],
    ...     adversarial_predictions=[0, 0, 0, 0, 1],
    ... )
    >>> print(results)
    {'clean_accuracy': 0.8, 'robust_accuracy': 0.2, 'attack_success_rate': 0.75, 'num_examples': 5, 'num_attacked': 4, 'num_successes': 3}

    With attack costs. Mean queries cover the four attacked examples, and the mean Hamming
    distance covers the three successes. The unused values of the fourth example are None.

    >>> hackattend = load_metric("hackattend", config_name="with_costs")
    >>> results = hackattend.compute(
    ...     references=[1, 0, 1, 1, 0],
    ...     predictions=[1, 0, 1, 0, 0],
    ...     adversarial_predictions=[0, 0, 0, 0, 1],
    ...     queries=[4, 12, 1, None, 7],
    ...     hamming_distances=[2.0, 0.0, 3.0, None, 1.0],
    ... )
    >>> print(results["mean_queries"], results["mean_hamming_distance"])
    6.0 2.0

    No clean prediction is correct, so nothing is attacked and the rates are 0.0.

    >>> hackattend = load_metric("hackattend")
    >>> results = hackattend.compute(references=[0, 1], predictions=[1, 0], adversarial_predictions=[1, 0])
    >>> print(results["attack_success_rate"], results["num_attacked"])
    0.0 0
"""

CONFIG_NAMES = ("default", "with_costs")


def _ratio(numerator: float, denominator: int) -> float:
    """Return `numerator / denominator`, or 0.0 when the denominator is 0."""
    return float(numerator) / denominator if denominator else 0.0


def _counted_values(
    name: str, values: list, counted: list[bool], minimum: float, what: str
) -> list[float]:
    """Return the entries of `values` at the `counted` positions, after checking each one."""
    if len(values) != len(counted):
        raise ValueError(f"{name} has {len(values)} entries, but there are {len(counted)} examples.")
    selected = []
    for index, (value, is_counted) in enumerate(zip(values, counted)):
        if not is_counted:
            continue
        if value is None:
            raise ValueError(f"{name}[{index}] is missing, but example {index} is {what}, so its value is needed.")
        if not math.isfinite(value) or value < minimum:
            raise ValueError(f"{name}[{index}] = {value!r} is invalid. Expected a finite number >= {minimum}.")
        selected.append(value)
    return selected


# evaluate names a module after its class in snake case, so `Hackattend` gives the name
# "hackattend", the same as the folder and the Space (`HackAttend` would give "hack_attend").
@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Hackattend(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in CONFIG_NAMES:
            raise ValueError(
                f"Unknown configuration {self.config_name!r} for the hackattend metric. "
                f"Choose one of {', '.join(map(repr, CONFIG_NAMES))}."
            )
        features = {
            "references": datasets.Value("int64"),
            "predictions": datasets.Value("int64"),
            "adversarial_predictions": datasets.Value("int64"),
        }
        if self.config_name == "with_costs":
            features["queries"] = datasets.Value("int64")
            features["hamming_distances"] = datasets.Value("float64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        adversarial_predictions: list[int],
        queries: list[int | None] | None = None,
        hamming_distances: list[float | None] | None = None,
    ) -> dict[str, float | int]:
        if self.config_name != "with_costs" and (queries is not None or hamming_distances is not None):
            # Arguments that are not features reach `_compute` without being stored, so they
            # would not line up with batches added through `add_batch`.
            raise ValueError(
                "queries and hamming_distances are inputs of the 'with_costs' configuration. Load the "
                "metric with config_name='with_costs' to pass them."
            )
        num_examples = len(references)
        if num_examples == 0:
            raise ValueError("The hackattend metric got no examples, and accuracies of an empty set are undefined.")

        for name, values in (("references", references), ("predictions", predictions)):
            if None in values:
                raise ValueError(f"{name}[{values.index(None)}] is missing. Every example needs a value.")

        attacked = [prediction == reference for prediction, reference in zip(predictions, references)]
        for index, (is_attacked, adversarial) in enumerate(zip(attacked, adversarial_predictions)):
            if is_attacked and adversarial is None:
                raise ValueError(
                    f"adversarial_predictions[{index}] is missing, but example {index} has a correct clean "
                    "prediction, so it was attacked and its adversarial prediction is needed."
                )

        robust = [
            is_attacked and adversarial == reference
            for is_attacked, adversarial, reference in zip(attacked, adversarial_predictions, references)
        ]
        successful = [is_attacked and not is_robust for is_attacked, is_robust in zip(attacked, robust)]
        num_attacked = sum(attacked)
        num_successes = sum(successful)

        results: dict[str, float | int] = {
            "clean_accuracy": _ratio(num_attacked, num_examples),
            "robust_accuracy": _ratio(sum(robust), num_examples),
            "attack_success_rate": _ratio(num_successes, num_attacked),
            "num_examples": num_examples,
            "num_attacked": num_attacked,
            "num_successes": num_successes,
        }
        if self.config_name == "with_costs":
            counted_queries = _counted_values("queries", queries, attacked, 0, "attacked")
            counted_distances = _counted_values(
                "hamming_distances", hamming_distances, successful, 0.0, "a successful attack"
            )
            results["mean_queries"] = _ratio(sum(counted_queries), num_attacked)
            results["mean_hamming_distance"] = _ratio(sum(counted_distances), num_successes)
        return results
