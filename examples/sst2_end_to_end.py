"""Fine-tune all-MiniLM-L6-v2 on SST-2, attack it with HackAttend and print the robustness report.

By default the script trains on the 2,000-sentence SST-2 sample in examples/data/sst2 for two
epochs and attacks its 200 dev sentences. scripts/demo.sh runs the same two steps, and README.md
gives its timing on an idle 2-core CPU (about 100 s of fine-tuning and 91 s of attack):

    python examples/sst2_end_to_end.py --output-dir runs/sst2

Add `--sattend-alpha 0.1` to train with S-Attend instead of the plain Trainer. The output folder
gets `model/` (the fine-tuned checkpoint, `finetune_args.json` and `eval_results.json`) and
`attack/` (`config.json`, `run.json`, `records.jsonl` and `report.json`). Rerun the same command to
resume an interrupted attack. For a quick trial, shrink the run with `--train-limit`,
`--eval-limit` and `--attack-limit`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from attend_robust import HackAttendConfig, HackAttendEvaluator, finetune, load_task_dataset
from attend_robust.hackattend import format_report

SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm",
                        help="Pretrained encoder: a folder, a hub name, or 'minilm' for the packaged "
                             "all-MiniLM-L6-v2 (default: minilm).")
    parser.add_argument("--data-dir", default=str(SAMPLE_DATA_DIR),
                        help="Folder that contains sst2/train.tsv and sst2/dev.tsv (default: the sample in "
                             "examples/data).")
    parser.add_argument("--output-dir", default="runs/examples/sst2",
                        help="Folder for model/ and attack/ (default: runs/examples/sst2).")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="Train on a seeded random sample of this many sentences (default: all).")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="Measure dev accuracy on this many sentences (default: all).")
    parser.add_argument("--attack-limit", type=int, default=None,
                        help="Attack this many dev sentences (default: all).")
    parser.add_argument("--epochs", type=float, default=2.0, help="Training epochs (default: 2).")
    parser.add_argument("--max-length", type=int, default=128,
                        help="Maximum sequence length in tokens, for training and attack (default: 128).")
    parser.add_argument("--sattend-alpha", type=float, default=0.0,
                        help="S-Attend masking probability in [0, 1). 0 trains with the plain Trainer (default: 0).")
    parser.add_argument("--alpha", type=float, default=0.01,
                        help="HackAttend budget: fraction of the units of one attention matrix masked per "
                             "perturbed head (default: 0.01).")
    parser.add_argument("--max-layers", type=int, default=None,
                        help="Layers the attack may perturb (default: all).")
    parser.add_argument("--max-heads", type=int, default=None,
                        help="Heads per layer the attack may perturb (default: all).")
    parser.add_argument("--seed", type=int, default=42, help="Seed of training and of the samples (default: 42).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    model_dir = output_dir / "model"

    # 1. Fine-tune. finetune() saves the model, its tokenizer and eval_results.json to model_dir.
    summary = finetune(
        args.model, "sst2", model_dir, data_dir=args.data_dir, train_limit=args.train_limit,
        eval_limit=args.eval_limit, epochs=args.epochs, max_length=args.max_length, seed=args.seed,
        sattend_alpha=args.sattend_alpha,
    )
    print(f"dev accuracy after fine-tuning: {summary['eval_accuracy']:.3f} on {summary['eval_examples']} sentences")

    # 2. Attack the saved checkpoint as any other: load it, pick the data, run the evaluator.
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dev = load_task_dataset("sst2", "dev", data_dir=args.data_dir, limit=args.attack_limit, seed=args.seed)
    config = HackAttendConfig(
        alpha=args.alpha, max_layers=args.max_layers, max_heads=args.max_heads, max_length=args.max_length
    )
    evaluator = HackAttendEvaluator(
        model, tokenizer, config, output_dir=output_dir / "attack",
        run_info={"model": str(model_dir), "dataset": "sst2", "split": "dev"},
    )
    report = evaluator.evaluate(dev)

    print(format_report(report))
    print(f"records and report: {output_dir / 'attack'}")
    return report


if __name__ == "__main__":
    main()
