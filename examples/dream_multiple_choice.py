"""Fine-tune all-MiniLM-L6-v2 for DREAM multiple choice, then attack it with HackAttend.

Each DREAM example (Sun et al., TACL 2019) is a dialogue, a question about it and three answers.
It is encoded as three sequences, dialogue and question paired with one answer each, and the
attack masks the same layers and heads in all three. Point --data-dir at a folder with
dream/train.json and dream/dev.json in the format of the DREAM release, or leave it out to load
`dataset-org/dream` from the Hugging Face Hub:

    python examples/dream_multiple_choice.py --data-dir ../shared/data --output-dir runs/dream

The defaults are the paper's fine-tuning settings for DREAM: 8 epochs of its 6,116 training
questions, learning rate 3e-5, batch 16. That is about 3,060 optimizer steps, and one CPU thread
took 9 to 50 s per step (docs/victims.md), so run the full setting on a GPU. For a quick trial,
use --train-limit, --attack-limit and --epochs. The output folder gets `model/` and `attack/`, as
in sst2_end_to_end.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoModelForMultipleChoice, AutoTokenizer

from attend_robust import HackAttendConfig, HackAttendEvaluator, finetune, load_task_dataset
from attend_robust.hackattend import format_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm",
                        help="Pretrained encoder: a folder, a hub name, or 'minilm' for the packaged "
                             "all-MiniLM-L6-v2 (default: minilm).")
    parser.add_argument("--data-dir", default=None,
                        help="Folder that contains dream/train.json and dream/dev.json (default: "
                             "$ATTEND_ROBUST_DATA_DIR, else ../shared/data if present, else the Hub).")
    parser.add_argument("--output-dir", default="runs/examples/dream",
                        help="Folder for model/ and attack/ (default: runs/examples/dream).")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="Train on a seeded random sample of this many questions (default: all).")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="Measure dev accuracy on this many questions (default: all).")
    parser.add_argument("--attack-limit", type=int, default=None, help="Attack this many dev questions (default: all).")
    parser.add_argument("--epochs", type=float, default=None, help="Training epochs (default: 8).")
    parser.add_argument("--batch-size", type=int, default=None, help="Questions per batch (default: 16).")
    parser.add_argument("--max-length", type=int, default=128,
                        help="Maximum tokens per (dialogue and question, answer) sequence. The dialogue's "
                             "earliest tokens are cut first (default: 128).")
    parser.add_argument("--alpha", type=float, default=0.01,
                        help="HackAttend budget: fraction of the units of one attention matrix masked per "
                             "perturbed head (default: 0.01).")
    parser.add_argument("--max-layers", type=int, default=None, help="Layers the attack may perturb (default: all).")
    parser.add_argument("--max-heads", type=int, default=None,
                        help="Heads per layer the attack may perturb (default: all).")
    parser.add_argument("--seed", type=int, default=42, help="Seed of training and of the samples (default: 42).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    model_dir = output_dir / "model"

    # finetune() picks AutoModelForMultipleChoice because the DREAM rows have a `choices` column.
    summary = finetune(
        args.model, "dream", model_dir, data_dir=args.data_dir, train_limit=args.train_limit,
        eval_limit=args.eval_limit, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
        seed=args.seed,
    )
    print(f"dev accuracy after fine-tuning: {summary['eval_accuracy']:.3f} on {summary['eval_examples']} questions")

    model = AutoModelForMultipleChoice.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dev = load_task_dataset("dream", "dev", data_dir=args.data_dir, limit=args.attack_limit, seed=args.seed)
    config = HackAttendConfig(
        alpha=args.alpha, max_layers=args.max_layers, max_heads=args.max_heads, max_length=args.max_length
    )
    evaluator = HackAttendEvaluator(
        model, tokenizer, config, output_dir=output_dir / "attack",
        run_info={"model": str(model_dir), "dataset": "dream", "split": "dev"},
    )
    report = evaluator.evaluate(dev)

    print(format_report(report))
    print(f"records and report: {output_dir / 'attack'}")
    return report


if __name__ == "__main__":
    main()
