"""`evaluate` metric modules that ship with attend-robust, and a loader for them.

Each metric is a folder in the layout of a Hugging Face metric Space (`<name>/<name>.py`,
`README.md`, `app.py`, `requirements.txt`), so it loads offline with `evaluate.load(<folder>)`
and can be uploaded to the Hub unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES: tuple[str, ...] = ("hackattend",)


def metric_path(name: str = "hackattend") -> Path:
    """Return the folder of the bundled metric `name`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}. The bundled metrics are: {', '.join(METRIC_NAMES)}.")
    return METRICS_DIR / name


def load_metric(name: str = "hackattend", **kwargs: Any) -> evaluate.EvaluationModule:
    """Load a bundled metric with `evaluate.load`, without contacting the Hub.

    `kwargs` go to `evaluate.load` (for example `config_name="with_costs"`, `experiment_id`,
    `num_process` and `process_id`).
    """
    # Imported here so that `import attend_robust` stays fast: importing evaluate (and datasets)
    # took about 3 s on a 2-core development machine.
    import evaluate

    return evaluate.load(str(metric_path(name)), **kwargs)


def metric_inputs_from_records(records: Iterable[Any]) -> dict[str, list[Any]]:
    """Turn HackAttend records into the inputs of the `hackattend` metric's `with_costs` configuration.

    `records` are `AttackRecord` objects or their dicts (lines of `records.jsonl`); skipped examples
    are left out, as the HackAttend report leaves them out. A failed attack keeps its clean
    prediction as the adversarial one.
    """
    inputs: dict[str, list[Any]] = {
        "references": [], "predictions": [], "adversarial_predictions": [], "queries": [], "hamming_distances": []
    }
    for record in records:
        values = record if isinstance(record, dict) else record.to_dict()
        if values["status"] == "skipped":
            continue
        success = values["status"] == "success"
        attacked = values["status"] in ("success", "failure")
        inputs["references"].append(values["label"])
        inputs["predictions"].append(values["clean_prediction"])
        inputs["adversarial_predictions"].append(
            values["adversarial_prediction"] if success else values["clean_prediction"]
        )
        inputs["queries"].append(values["queries"] if attacked else None)
        inputs["hamming_distances"].append(values["hamming"] if success else None)
    return inputs


__all__ = ["METRIC_NAMES", "load_metric", "metric_inputs_from_records", "metric_path"]
