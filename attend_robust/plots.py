"""Figures of HackAttend runs: where successful perturbations fall, attention before and after, ASR against alpha.

Each function draws from a finished run folder (`report.json`, `records.jsonl`, `config.json` and
`run.json`, as `HackAttendEvaluator` writes them) and returns the numbers it plotted, so that a
figure can be checked against the run. `plot_runs` writes every figure as PNG and SVG and the
plotted numbers as `plots.json`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

logger = logging.getLogger(__name__)

FIGURE_FORMATS = ("png", "svg")


@dataclass
class Run:
    """A finished HackAttend run folder, read from its JSON files."""

    path: Path
    config: dict[str, Any]
    report: dict[str, Any]
    run_info: dict[str, Any]
    dataset_fingerprint: str | None = None  # of the attacked example ids, as in run.json

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        path = Path(path)
        report_path = path / "report.json"
        if not report_path.is_file():
            raise FileNotFoundError(
                f"{report_path} not found. Plots need a finished run: run `attend-robust attack` with "
                f"--output-dir {path} until it writes report.json."
            )
        report = json.loads(report_path.read_text(encoding="utf-8"))
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        run_file = path / "run.json"
        saved_run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
        return cls(
            path=path, config=config, report=report, run_info=saved_run.get("run_info", {}),
            dataset_fingerprint=saved_run.get("dataset_fingerprint"),
        )

    @property
    def label(self) -> str:
        config = self.config
        rankings = "/".join(str(config.get(key)) for key in ("layer_ranking", "head_ranking", "unit_ranking"))
        return f"{self.path.name} (l_max {config.get('max_layers')}, h_max {config.get('max_heads')}, {rankings})"

    def records(self) -> list[dict[str, Any]]:
        with (self.path / "records.jsonl").open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]


def _save(figure: plt.Figure, output_dir: Path, stem: str) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for extension in FIGURE_FORMATS:
        path = output_dir / f"{stem}.{extension}"
        figure.savefig(path, bbox_inches="tight", dpi=150)
        paths.append(path)
    plt.close(figure)
    return paths


def layer_success_counts(run: Run) -> dict[str, Any]:
    """Return the normalised count of successes by layer, with failures at layer -1.

    Layers are numbered from 1, as in Figure 3 of Liong et al., "Unveiling Vulnerability of
    Self-Attention" (LREC-COLING 2024). Each count is divided by the number of
    attacked examples, so the bars of one run sum to 1.
    """
    report = run.report
    attacked = report["clean_correct"]
    counts = [report["failures"], *report["successes_by_layer"]]
    labels = ["-1", *(str(layer + 1) for layer in range(len(report["successes_by_layer"])))]
    fractions = [count / attacked if attacked else 0.0 for count in counts]
    return {"labels": labels, "counts": counts, "fractions": fractions}


def plot_layer_successes(runs: Sequence[Run], output_dir: Path) -> tuple[list[Path], list[dict[str, Any]]]:
    """Draw successes by layer (failures at -1) for each run, side by side."""
    data = [layer_success_counts(run) for run in runs]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(runs)
    for offset, (run, counts) in enumerate(zip(runs, data)):
        positions = np.arange(len(counts["labels"])) + offset * width
        axis.bar(positions, counts["fractions"], width=width, label=run.path.name)
    axis.set_xticks(np.arange(len(data[0]["labels"])) + 0.4 - width / 2, data[0]["labels"])
    axis.set_xlabel("layer of the flipping head, from 1 (-1: attack failed; records count layers from 0)")
    axis.set_ylabel("fraction of attacked examples")
    axis.set_title("HackAttend successes by layer")
    axis.legend(fontsize="small")
    return _save(figure, output_dir, "successes_by_layer"), data


def plot_head_heatmap(run: Run, output_dir: Path) -> tuple[list[Path], list[list[int]]]:
    """Draw a layers x heads heatmap of where successful perturbations flipped the prediction."""
    counts = run.report["successes_by_head"]
    figure, axis = plt.subplots(figsize=(0.45 * len(counts[0]) + 2, 0.45 * len(counts) + 1.5))
    image = axis.imshow(np.array(counts), cmap="viridis", aspect="auto")
    axis.set_xticks(range(len(counts[0])), [str(head + 1) for head in range(len(counts[0]))])
    axis.set_yticks(range(len(counts)), [str(layer + 1) for layer in range(len(counts))])
    axis.set_xlabel("head, from 1 (records count from 0)")
    axis.set_ylabel("layer, from 1")
    axis.set_title(f"Successes by head: {run.path.name}")
    figure.colorbar(image, ax=axis, label="successful examples")
    return _save(figure, output_dir, f"{run.path.name}_successes_by_head"), counts


def asr_by_alpha(runs: Sequence[Run]) -> dict[str, list[tuple[float, float]]]:
    """Group runs by everything but alpha; return `(alpha, ASR)` points per group, sorted by alpha."""
    groups: dict[str, list[tuple[float, float]]] = {}
    names: dict[tuple[str, float], list[str]] = {}
    for run in runs:
        config = run.config
        key = (
            f"l_max {config.get('max_layers')}, h_max {config.get('max_heads')}, "
            f"{config.get('layer_ranking')}/{config.get('head_ranking')}/{config.get('unit_ranking')}"
        )
        rate = run.report["attack_success_rate"]
        groups.setdefault(key, []).append((float(config["alpha"]), 0.0 if rate is None else float(rate)))
        names.setdefault((key, float(config["alpha"])), []).append(str(run.path))
    for (key, alpha), paths in names.items():
        if len(paths) > 1:
            logger.warning(
                "Runs %s share alpha %g and the settings %s, so they give points at the same alpha in asr_by_alpha. "
                "Attack with other alpha values to draw ASR against alpha.", ", ".join(paths), alpha, key,
            )
    return {key: sorted(points) for key, points in groups.items()}


def plot_asr_by_alpha(runs: Sequence[Run], output_dir: Path) -> tuple[list[Path], dict[str, Any]]:
    """Draw attack success rate against alpha, one line per group of otherwise equal settings."""
    groups = asr_by_alpha(runs)
    figure, axis = plt.subplots(figsize=(5.5, 3.5))
    for key, points in groups.items():
        alphas, rates = zip(*points)
        axis.plot([100 * a for a in alphas], [100 * r for r in rates], marker="o", label=key)
    axis.set_xlabel("alpha (% of units per perturbed matrix)")
    axis.set_ylabel("attack success rate (%)")
    axis.set_title("ASR against alpha")
    axis.legend(fontsize="x-small")
    return _save(figure, output_dir, "asr_by_alpha"), groups


def attention_before_after(
    run: Run,
    example_id: str | None = None,
    *,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Compute the attention map of the flipping head of one successful example, clean and perturbed.

    Loads the run's model and dataset (from `run.json`, with the column mapping under `columns` when it
    has one), re-encodes the example as the attack did, and returns the tokens, both `[S, S]` maps
    (non-padding tokens only), the head and the masked units. Without `example_id`, the first
    successful example is used.
    """
    import torch
    from transformers import AutoTokenizer

    from .data import encode_dataset, load_task_dataset, task_kind
    from .hackattend.evaluator import ids_fingerprint
    from .masked_model import AttentionMaskedModel
    from .models import load_fine_tuned, resolve_model_name_or_path

    records = [record for record in run.records() if record["status"] == "success"]
    if example_id is not None:
        records = [record for record in records if record["example_id"] == example_id]
    if not records:
        target = f"example {example_id!r}" if example_id else "any example"
        raise ValueError(f"The run in {run.path} has no successful attack on {target}; choose another example.")
    record = records[0]

    info = run.run_info
    for key in ("model", "dataset", "split"):
        if key not in info:
            raise ValueError(f"{run.path / 'run.json'} does not name the run's {key}; attention maps need it.")
    dataset = load_task_dataset(
        info["dataset"], info["split"], data_dir=data_dir or info.get("data_dir"),
        limit=info.get("limit"), seed=info.get("limit_seed", 0), **info.get("columns", {}),
    )
    ids = [str(value) for value in dataset["example_id"]]
    same_ids = run.dataset_fingerprint is None or ids_fingerprint(ids) == run.dataset_fingerprint
    if not same_ids or record["index"] >= len(ids) or ids[record["index"]] != record["example_id"]:
        raise ValueError(
            f"The dataset loaded for {run.path} (data folder {data_dir or info.get('data_dir') or 'the default'}) "
            f"is not the one attacked: its example ids differ, or example {record['example_id']!r} is not at "
            f"position {record['index']}. Pass the attack's --data-dir, or --no-attention to skip the attention maps."
        )
    dataset = dataset.select([record["index"]])
    multiple_choice = task_kind(dataset) == "multiple-choice"
    model_name = info.get("model_path") or info["model"]
    model = load_fine_tuned(model_name, multiple_choice, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name_or_path(model_name))

    encoded = encode_dataset(dataset, tokenizer, max_length=int(run.config.get("max_length", 128)))
    if isinstance(encoded, tuple):
        encoded = encoded[0]
    row = encoded[0]
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in row]
    if multiple_choice:  # pad the choices to one length, as the attack did
        choices = [{name: row[name][choice] for name in names} for choice in range(len(row["input_ids"]))]
        padded = tokenizer.pad(choices, return_tensors="pt")
        inputs = {name: padded[name].unsqueeze(0) for name in names}
    else:
        inputs = {name: torch.tensor(row[name]).unsqueeze(0) for name in names}

    sequence, layer, head, _ = record["mask"][-1]
    with AttentionMaskedModel(model) as wrapped:
        seq_len = inputs["input_ids"].shape[-1]
        num_sequences = inputs["input_ids"].shape[1] if multiple_choice else 1
        keep = torch.ones(num_sequences, wrapped.num_layers, wrapped.num_heads, seq_len, seq_len, dtype=torch.bool)
        for unit_sequence, unit_layer, unit_head, positions in record["mask"]:
            for offset in range(0, len(positions), 2):
                keep[unit_sequence, unit_layer, unit_head, positions[offset], positions[offset + 1]] = False
        clean = wrapped.attention_saliency(inputs, method="score")[sequence, layer, head]
        perturbed = wrapped.attention_saliency(inputs, method="score", unit_mask=keep)[sequence, layer, head]

    token_ids = inputs["input_ids"].reshape(-1, seq_len)[sequence]
    length = int(inputs["attention_mask"].reshape(-1, seq_len)[sequence].sum())
    return {
        "example_id": record["example_id"],
        "sequence": sequence,
        "layer": layer,
        "head": head,
        "tokens": tokenizer.convert_ids_to_tokens(token_ids[:length].tolist()),
        "clean": clean[:length, :length].tolist(),
        "perturbed": perturbed[:length, :length].tolist(),
        "masked_units": [
            [positions[offset], positions[offset + 1]]
            for unit_sequence, unit_layer, unit_head, positions in record["mask"]
            if (unit_sequence, unit_layer, unit_head) == (sequence, layer, head)
            for offset in range(0, len(positions), 2)
        ],
        "clean_prediction": record["clean_prediction"],
        "adversarial_prediction": record["adversarial_prediction"],
    }


def plot_attention_before_after(maps: dict[str, Any], output_dir: Path, stem: str) -> list[Path]:
    """Draw the clean and perturbed attention maps of one head side by side, tokens on both axes."""
    tokens = maps["tokens"]
    size = max(4.0, 0.28 * len(tokens) + 2)
    figure, axes = plt.subplots(1, 2, figsize=(2 * size, size), constrained_layout=True)
    for axis, key, title in (
        (axes[0], "clean", f"clean (prediction {maps['clean_prediction']})"),
        (axes[1], "perturbed", f"perturbed (prediction {maps['adversarial_prediction']})"),
    ):
        axis.imshow(np.array(maps[key]), cmap="Blues", vmin=0.0)
        axis.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
        axis.set_yticks(range(len(tokens)), tokens, fontsize=7)
        axis.set_xlabel("key")
        axis.set_ylabel("query")
        axis.set_title(title)
    for query, key in maps["masked_units"]:
        if query < len(tokens) and key < len(tokens):
            axes[1].add_patch(plt.Rectangle((key - 0.5, query - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
    figure.suptitle(
        f"example {maps['example_id']}: layer {maps['layer'] + 1}, head {maps['head'] + 1} "
        f"(from 1; layer {maps['layer']}, head {maps['head']} in the records)"
    )
    return _save(figure, output_dir, stem)


def plot_runs(
    run_dirs: Sequence[str | Path],
    output_dir: str | Path | None = None,
    *,
    example_id: str | None = None,
    attention: bool = True,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Write every figure for `run_dirs` and return the paths and plotted numbers.

    Args:
        run_dirs: finished run folders.
        output_dir: where the figures go. Default: `plots/` inside the first run folder.
        example_id: the example whose attention maps are drawn. Default: the first success of the
            first run that has one.
        attention: draw the before/after attention maps (loads the model and the dataset).
        data_dir: folder of local datasets, for the attention maps of runs on `sst2` or `dream`.

    Returns a dict with `files` (paths written) and `data` (the numbers behind each figure),
    which is also saved as `plots.json` in `output_dir`.
    """
    runs = [Run.load(path) for path in run_dirs]
    if not runs:
        raise ValueError("Give at least one run folder to plot.")
    target = Path(output_dir) if output_dir is not None else runs[0].path / "plots"
    files: list[Path] = []
    data: dict[str, Any] = {}

    paths, data["successes_by_layer"] = plot_layer_successes(runs, target)
    files += paths
    data["successes_by_head"] = {}
    for run in runs:
        paths, data["successes_by_head"][run.path.name] = plot_head_heatmap(run, target)
        files += paths
    if len(runs) > 1:
        paths, data["asr_by_alpha"] = plot_asr_by_alpha(runs, target)
        files += paths
    if attention:
        for run in runs:
            if run.report.get("successes", 0) == 0:
                continue
            maps = attention_before_after(run, example_id, data_dir=data_dir)
            files += plot_attention_before_after(maps, target, f"{run.path.name}_attention_{maps['example_id']}")
            data["attention"] = maps
            break
        else:
            logger.warning("No run has a successful attack, so no attention maps were drawn.")

    (target / "plots.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return {"files": [str(path) for path in files], "data": data}
