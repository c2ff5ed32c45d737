"""Summary metrics of a HackAttend run, computed from its per-example records only."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any, Iterable

from .records import AttackRecord


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def summarize(records: Iterable[AttackRecord], num_layers: int, num_heads: int) -> dict[str, Any]:
    """Compute the run's metrics from its records.

    Definitions (accuracies and ASR are fractions in [0, 1], `None` when the denominator is 0):

    - `evaluated`: examples not skipped. `clean_accuracy` = correctly predicted / evaluated.
    - `robust_accuracy` = examples still correct under the attack (failures) / evaluated; examples
      predicted wrongly on clean input count as wrong and are not attacked.
    - `attack_success_rate` = successes / correctly predicted examples.
    - `mean_queries` and `median_queries` cover every attacked example (success or give-up);
      `mean_queries_success` only successes. A query is one forward pass with a perturbed mask;
      ranking and saliency passes are counted in `mean_model_evaluations` only.
    - `mean_layer_evaluations`: over evaluated examples (misclassified ones included), the
      attention-layer evaluations the search spent, after prefix reuse and with the queries that
      a batch evaluated after a success. It measures cost; the other figures measure decisions.
    - `mean_hamming`: over successes, the masked units per perturbed attention matrix.
      `masked_fraction`: over successes, the mean of masked units / candidate units of the
      perturbed matrices.
    - `successes_by_layer[l]` and `successes_by_head[l][h]`: successes whose last, flipping head
      was in layer l (head h). Failures are counted in `failures`. Figure 3 of Unveiling Vulnerability
      of Self-Attention (LREC-COLING 2024) plots this count per layer, with failures as layer -1.
    - `timing`: wall-time figures, the only part that differs between two identical runs.
    """
    records = sorted(records, key=lambda record: record.index)
    skipped = [record for record in records if record.status == "skipped"]
    evaluated = [record for record in records if record.status != "skipped"]
    attacked = [record for record in evaluated if record.attacked]
    successes = [record for record in attacked if record.success]
    failures = [record for record in attacked if not record.success]

    by_layer = [0] * num_layers
    by_head = [[0] * num_heads for _ in range(num_layers)]
    for record in successes:
        layer, head = record.perturbed_heads[-1]
        by_layer[layer] += 1
        by_head[layer][head] += 1

    queries = [record.queries for record in attacked]
    success_seconds = [record.seconds for record in successes]
    return {
        "examples": len(records),
        "evaluated": len(evaluated),
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(record.skip_reason for record in skipped).items())),
        "truncated": sum(record.truncated for record in evaluated),
        "clean_correct": len(attacked),
        "successes": len(successes),
        "failures": len(failures),
        "clean_accuracy": _ratio(len(attacked), len(evaluated)),
        "robust_accuracy": _ratio(len(failures), len(evaluated)),
        "attack_success_rate": _ratio(len(successes), len(attacked)),
        "mean_queries": _mean(queries),
        "median_queries": statistics.median(queries) if queries else None,
        "mean_queries_success": _mean([record.queries for record in successes]),
        "mean_model_evaluations": _mean([record.model_evaluations for record in attacked]),
        "mean_layer_evaluations": _mean([record.layer_evaluations for record in evaluated]),
        "mean_hamming": _mean([record.hamming for record in successes]),
        "masked_fraction": _mean(
            [record.num_masked_units / record.candidate_units for record in successes if record.candidate_units]
        ),
        "mean_perturbed_heads_success": _mean([len(record.perturbed_heads) for record in successes]),
        "ranking_fallbacks": sum(record.ranking_fallbacks for record in attacked),
        "examples_with_ranking_fallback": sum(record.ranking_fallbacks > 0 for record in attacked),
        "successes_by_layer": by_layer,
        "successes_by_head": by_head,
        "timing": {
            "attack_seconds": sum(record.seconds for record in records),
            "mean_seconds_per_attacked": _mean([record.seconds for record in attacked]),
            "mean_seconds_per_success": _mean(success_seconds),
        },
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    """Render the main figures of a report as a two-column text table."""
    skipped = ", ".join(f"{reason}: {count}" for reason, count in report["skipped_by_reason"].items()) or "none"
    rows = [
        ("examples", str(report["examples"])),
        ("evaluated", str(report["evaluated"])),
        ("skipped", f"{report['skipped']} ({skipped})"),
        ("truncated", str(report["truncated"])),
        ("clean accuracy", _percent(report["clean_accuracy"])),
        ("robust accuracy", _percent(report["robust_accuracy"])),
        ("attack success rate", f"{_percent(report['attack_success_rate'])} "
                                f"({report['successes']} of {report['clean_correct']})"),
        ("mean queries (attacked)", _number(report["mean_queries"])),
        ("median queries (attacked)", _number(report["median_queries"])),
        ("mean queries (successes)", _number(report["mean_queries_success"])),
        ("mean model evaluations", _number(report["mean_model_evaluations"])),
        ("mean layer evaluations", _number(report.get("mean_layer_evaluations"))),
        ("mean Hamming (successes)", _number(report["mean_hamming"])),
        ("masked fraction (successes)", _percent(report["masked_fraction"])),
        ("ranking fallbacks", f"{report['ranking_fallbacks']} in {report['examples_with_ranking_fallback']} examples"),
        ("successes by layer", " ".join(str(count) for count in report["successes_by_layer"])),
        ("seconds per success", _number(report["timing"]["mean_seconds_per_success"], 2)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])
