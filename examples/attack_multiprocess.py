"""Attack a fine-tuned checkpoint with HackAttend in several processes started by `accelerate launch`.

Each process attacks its share of the examples and appends records to its own file. When all are
done, the main process merges them into records.jsonl and writes report.json, which equal those
of a single-process run. Two processes on one machine with two GPUs, or with none:

    accelerate launch --config_file examples/accelerate_cpu_2proc.yaml examples/attack_multiprocess.py \
        --model runs/examples/sst2/model --output-dir runs/examples/sst2-attack-2proc

Run it with plain `python` for a single process. An interrupted run resumes when it is started
again with the same output folder, with any number of processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoModelForMultipleChoice, AutoModelForSequenceClassification, AutoTokenizer

from attend_robust import HackAttendConfig, HackAttendEvaluator, load_task_dataset
from attend_robust.data import MULTIPLE_CHOICE, task_kind
from attend_robust.hackattend import format_report
from attend_robust.hackattend.evaluator import default_accelerator

SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Folder of a fine-tuned classification or multiple-choice model.")
    parser.add_argument("--dataset", default="sst2",
                        help="'sst2', 'dream', a .csv/.tsv/.json/.jsonl file or a folder of split files (default: sst2).")
    parser.add_argument("--split", default="dev", help="Split to attack (default: dev).")
    parser.add_argument("--data-dir", default=str(SAMPLE_DATA_DIR),
                        help="Folder with sst2/ and dream/ (default: the SST-2 sample in examples/data).")
    parser.add_argument("--limit", type=int, default=None, help="Attack this many examples (default: all).")
    parser.add_argument("--output-dir", required=True, help="Folder for config.json, records.jsonl and report.json.")
    parser.add_argument("--alpha", type=float, default=0.01,
                        help="Fraction of the units of one attention matrix masked per perturbed head (default: 0.01).")
    parser.add_argument("--max-layers", type=int, default=None, help="Layers the attack may perturb (default: all).")
    parser.add_argument("--max-heads", type=int, default=None,
                        help="Heads per layer the attack may perturb (default: all).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # On a machine without GPU, a plain Accelerator() ignores the launcher's process group in
    # Accelerate 1.16 and every process would attack every example. default_accelerator() joins it.
    accelerator = default_accelerator()

    dataset = load_task_dataset(args.dataset, args.split, data_dir=args.data_dir, limit=args.limit)
    model_class = AutoModelForMultipleChoice if task_kind(dataset) == MULTIPLE_CHOICE else AutoModelForSequenceClassification
    model = model_class.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    config = HackAttendConfig(alpha=args.alpha, max_layers=args.max_layers, max_heads=args.max_heads)
    evaluator = HackAttendEvaluator(
        model, tokenizer, config, output_dir=args.output_dir, accelerator=accelerator,
        run_info={"model": args.model, "dataset": args.dataset, "split": args.split, "limit": args.limit},
    )
    report = evaluator.evaluate(dataset)  # every process returns the same report

    if accelerator.is_main_process:
        print(f"{accelerator.num_processes} process(es) attacked {report['examples']} examples")
        print(format_report(report))
    # Wait for every process, then destroy the process group, because a process that exits while
    # another still works in the group can abort at interpreter exit.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


if __name__ == "__main__":
    main()
