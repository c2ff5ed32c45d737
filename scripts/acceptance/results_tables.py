"""Print the markdown rows of docs/results.md from attack folders.

Every figure is recomputed from the folder's `records.jsonl` with `attend_robust.hackattend.summarize`,
so rows of runs made by different versions read alike. The wall time is the sum of the entries of
the folder's `wall_time.json` (one per command, resumed runs add one each).

    python scripts/acceptance/results_tables.py "full=runs/attacks/sst2-full" "half=runs/attacks/sst2-half"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from attend_robust.hackattend import read_records, summarize


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def row(label: str, folder: Path) -> tuple[str, str]:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    saved = json.loads((folder / "report.json").read_text(encoding="utf-8"))  # for the model's size
    report = summarize(read_records(folder / "records.jsonl"), saved["num_layers"], saved["num_heads"])
    wall = folder / "wall_time.json"
    seconds = sum(entry["seconds"] for entry in json.loads(wall.read_text(encoding="utf-8"))) if wall.exists() else None
    per_success = report["timing"]["mean_seconds_per_success"]
    # Records written before version 0.1.0 counted no layer evaluations.
    layer_evaluations = report["mean_layer_evaluations"] or None
    line = (
        f"| {label} | {config['max_layers']} x {config['max_heads']} | {config['alpha'] * 100:g}% | "
        f"{percent(report['clean_accuracy'])} | {percent(report['attack_success_rate'])} "
        f"({report['successes']}/{report['clean_correct']}) | {percent(report['robust_accuracy'])} | "
        f"{number(report['mean_queries'])} ({number(report['mean_queries_success'])}) | "
        f"{number(report['mean_hamming'])} | {number(report['mean_model_evaluations'])} | "
        f"{number(layer_evaluations, 0)} | {number(per_success, 2)} | "
        f"{'n/a' if seconds is None else f'{seconds / 60:.1f} min'} |"
    )
    note = (
        f"- {label}: successes by layer of the flipping head (layer 0 first): {report['successes_by_layer']}; "
        f"skipped: {report['skipped']}; truncated inputs: {report['truncated']}; score fallbacks: "
        f"{report['ranking_fallbacks']}; masked fraction: {percent(report['masked_fraction'])} %."
    )
    return line, note


def main(arguments: list[str]) -> None:
    print("| run | layers x heads | alpha | clean % | ASR % (successes) | robust % | queries (successes only) "
          "| Hamming | evaluations | layer evaluations | s per success | wall time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for argument in arguments:
        label, _, folder = argument.partition("=")
        line, note = row(label, Path(folder))
        print(line)
        notes.append(note)
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main(sys.argv[1:])
