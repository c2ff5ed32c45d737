"""The `attend-robust attack` subcommand: run HackAttend on a dataset and print the report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from .config import SELECTION_RANKINGS, UNIT_RANKINGS, HackAttendConfig
from .report import format_report

logger = logging.getLogger(__name__)


def _help(name: str) -> str:
    fields = {f.name: f for f in dataclasses.fields(HackAttendConfig)}
    return str(fields[name].metadata["help"])


def add_attack_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `attack` subcommand on `subparsers` and return its parser."""
    parser = subparsers.add_parser(
        "attack",
        help="Run the HackAttend attack on a fine-tuned model and a labelled dataset.",
        description=(
            "Search, for every correctly predicted example, a small attention mask that flips the prediction. "
            "Records go to OUTPUT_DIR/records.part-<process>.jsonl as examples finish and are merged into "
            "OUTPUT_DIR/records.jsonl at the end. A rerun with the same OUTPUT_DIR resumes. The report is "
            "printed and written to OUTPUT_DIR/report.json. Run several processes with "
            "`accelerate launch --multi_gpu --num_processes N -m attend_robust.cli attack ...`, which also runs on a "
            "machine without GPU (with Accelerate 1.16, `--cpu` starts a single process)."
        ),
    )
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", required=True, help="Folder or hub name of a fine-tuned classification or "
                      "multiple-choice model.")
    data.add_argument("--dataset", required=True, help="'sst2', 'dream', a local .csv/.tsv/.json/.jsonl file or "
                      "folder, or a hub dataset name.")
    data.add_argument("--split", default="dev", help="Split to attack (default: dev).")
    data.add_argument("--data-dir", default=None, help="Folder with local copies of sst2/ and dream/ "
                      "(default: $ATTEND_ROBUST_DATA_DIR, else ../shared/data if present, else the hub).")
    data.add_argument("--limit", type=int, default=None, help="Attack a seeded random sample of this many "
                      "examples, kept in dataset order (default: all).")
    data.add_argument("--limit-seed", type=int, default=0, help="Seed of the --limit sample (default: 0).")
    for column in ("text", "text-pair", "label", "question", "choices", "context"):
        data.add_argument(f"--{column}-column", default=None,
                          help=f"Source column for the standard `{column.replace('-', '_')}` column.")

    search = parser.add_argument_group("search settings")
    defaults = HackAttendConfig()
    search.add_argument("--alpha", type=float, default=defaults.alpha, help=_help("alpha"))
    search.add_argument("--max-layers", type=int, default=None, help=_help("max_layers"))
    search.add_argument("--max-heads", type=int, default=None, help=_help("max_heads"))
    search.add_argument("--unit-ranking", choices=UNIT_RANKINGS, default=defaults.unit_ranking,
                        help=_help("unit_ranking"))
    search.add_argument("--layer-ranking", choices=SELECTION_RANKINGS, default=defaults.layer_ranking,
                        help=_help("layer_ranking"))
    search.add_argument("--head-ranking", choices=SELECTION_RANKINGS, default=defaults.head_ranking,
                        help=_help("head_ranking"))
    search.add_argument("--no-protect-first-token", dest="protect_first_token", action="store_false",
                        help="Allow masking the first token's key column (protected by default).")
    search.add_argument("--seed", type=int, default=defaults.seed, help=_help("seed"))
    search.add_argument("--max-length", type=int, default=defaults.max_length, help=_help("max_length"))
    search.add_argument("--query-batch-size", type=int, default=defaults.query_batch_size,
                        help=_help("query_batch_size"))
    search.add_argument("--example-batch-size", type=int, default=defaults.example_batch_size,
                        help=_help("example_batch_size"))
    search.add_argument("--forward-batch-size", type=int, default=defaults.forward_batch_size,
                        help=_help("forward_batch_size"))

    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", required=True, help="Folder for config.json, records.jsonl and report.json.")
    output.add_argument("--no-progress", dest="progress", action="store_false", help="Hide the progress bar.")
    parser.set_defaults(func=run_attack)
    return parser


def config_from_args(args: argparse.Namespace) -> HackAttendConfig:
    return HackAttendConfig(
        alpha=args.alpha,
        max_layers=args.max_layers,
        max_heads=args.max_heads,
        unit_ranking=args.unit_ranking,
        layer_ranking=args.layer_ranking,
        head_ranking=args.head_ranking,
        protect_first_token=args.protect_first_token,
        seed=args.seed,
        max_length=args.max_length,
        query_batch_size=args.query_batch_size,
        example_batch_size=args.example_batch_size,
        forward_batch_size=args.forward_batch_size,
    )


def run_attack(args: argparse.Namespace) -> int:
    """Load the model and dataset named in `args`, run the evaluator and print the report."""
    # Imported here so that `attend-robust --help` stays fast.
    from transformers import AutoTokenizer

    from ..data import MULTIPLE_CHOICE, load_task_dataset, resolve_data_dir, task_kind
    from ..models import load_fine_tuned, resolve_model_name_or_path
    from .evaluator import HackAttendEvaluator, default_accelerator

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    config = config_from_args(args)
    accelerator = default_accelerator()

    columns = {
        f"{name}_column": getattr(args, f"{name}_column")
        for name in ("text", "text_pair", "label", "question", "choices", "context")
        if getattr(args, f"{name}_column") is not None
    }
    dataset = load_task_dataset(
        args.dataset, args.split, data_dir=args.data_dir, limit=args.limit, seed=args.limit_seed, **columns
    )
    kind = task_kind(dataset)
    model = load_fine_tuned(args.model, multiple_choice=kind == MULTIPLE_CHOICE, attn_implementation="eager")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name_or_path(args.model))

    run_info: dict[str, Any] = {
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "limit": args.limit,
        "limit_seed": args.limit_seed,
    }
    # Absolute paths, so that `attend-robust plot` finds the model and the data from any folder.
    if Path(args.model).is_dir():
        run_info["model_path"] = str(Path(args.model).resolve())
    data_dir = resolve_data_dir(args.data_dir) if args.dataset.strip().lower().replace("-", "") in ("sst2", "dream") else None
    if data_dir is not None:  # only the built-in datasets are read from a data folder
        run_info["data_dir"] = str(data_dir.resolve())
    if columns:
        # `attend-robust plot` reloads the dataset with the same column mapping for its attention maps.
        run_info["columns"] = columns
    evaluator = HackAttendEvaluator(
        model, tokenizer, config, output_dir=args.output_dir, accelerator=accelerator,
        progress=args.progress, run_info=run_info,
    )
    try:
        report = evaluator.evaluate(dataset)
    except KeyboardInterrupt:
        if accelerator.is_main_process:
            _record_wall_time(args.output_dir, time.perf_counter() - started, accelerator.num_processes, True)
        raise

    if accelerator.is_main_process:
        elapsed = time.perf_counter() - started
        print(f"HackAttend on {args.dataset} ({args.split}) with {args.model}: "
              f"{evaluator.config.max_layers} layers x {evaluator.config.max_heads} heads, alpha {config.alpha}")
        print(format_report(report))
        print(f"wall time of this command: {elapsed:.0f} s; report: {Path(args.output_dir) / 'report.json'}")
        _record_wall_time(args.output_dir, elapsed, accelerator.num_processes, False)
    return 0


def _record_wall_time(output_dir: str, seconds: float, processes: int, interrupted: bool) -> None:
    """Append this invocation's wall time to OUTPUT_DIR/wall_time.json, one entry per invocation."""
    path = Path(output_dir) / "wall_time.json"
    if not path.parent.is_dir():  # stopped before the run created its folder
        return
    timings = json.loads(path.read_text()) if path.exists() else []
    entry: dict[str, Any] = {"seconds": seconds, "processes": processes}
    if interrupted:
        entry["interrupted"] = True
    timings.append(entry)
    path.write_text(json.dumps(timings, indent=2) + "\n")
