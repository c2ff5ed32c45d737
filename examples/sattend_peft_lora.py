"""Train a LoRA adapter with S-Attend, merge it, and attack the merged model with HackAttend.

SAttendTrainer takes a PEFT model as Trainer does and masks the attention of its base model, so
only the LoRA weights and the classifier head are trained. After training the script saves:

- `adapter/`: the adapter (`adapter_config.json`, `adapter_model.safetensors`) and a model card
  with the S-Attend settings,
- `merged/`: the base model with the adapter merged in, a plain transformers checkpoint whose
  config.json records the S-Attend settings, and whose card gets the HackAttend results,
- `attack/`: the HackAttend records and report of the merged model.

    python examples/sattend_peft_lora.py --output-dir runs/lora

Needs the `peft` extra: pip install "attend-robust[peft]".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from attend_robust import (
    HackAttendConfig,
    HackAttendEvaluator,
    SAttendTrainer,
    SAttendTrainingArguments,
    load_task_dataset,
)
from attend_robust.data import encode_dataset
from attend_robust.hackattend import format_report
from attend_robust.hub import hub_model_id, update_model_card
from attend_robust.models import resolve_model_name_or_path

SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "data"
MODEL_INPUTS = ["input_ids", "attention_mask", "token_type_ids", "label"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm",
                        help="Pretrained encoder: a folder, a hub name, or 'minilm' for the packaged "
                             "all-MiniLM-L6-v2 (default: minilm).")
    parser.add_argument("--data-dir", default=str(SAMPLE_DATA_DIR),
                        help="Folder that contains sst2/train.tsv and sst2/dev.tsv (default: the sample in "
                             "examples/data).")
    parser.add_argument("--output-dir", default="runs/examples/lora",
                        help="Folder for adapter/, merged/ and attack/ (default: runs/examples/lora).")
    parser.add_argument("--train-limit", type=int, default=None, help="Train on this many sentences (default: all).")
    parser.add_argument("--eval-limit", type=int, default=None, help="Evaluate on this many sentences (default: all).")
    parser.add_argument("--attack-limit", type=int, default=None, help="Attack this many dev sentences (default: all).")
    parser.add_argument("--epochs", type=float, default=3.0, help="Training epochs (default: 3).")
    parser.add_argument("--learning-rate", type=float, default=5e-4,
                        help="Peak learning rate, usually higher for LoRA than for full fine-tuning (default: 5e-4).")
    parser.add_argument("--lora-rank", type=int, default=8, help="Rank r of the LoRA matrices (default: 8).")
    parser.add_argument("--sattend-alpha", type=float, default=0.1,
                        help="S-Attend masking probability in [0, 1) (default: 0.1).")
    parser.add_argument("--sattend-granularity", choices=("unit", "token"), default="unit",
                        help="Mask single attention units or whole key tokens (default: unit).")
    parser.add_argument("--max-length", type=int, default=128, help="Maximum sequence length in tokens (default: 128).")
    parser.add_argument("--alpha", type=float, default=0.01,
                        help="HackAttend budget: fraction of the units of one attention matrix masked per "
                             "perturbed head (default: 0.01).")
    parser.add_argument("--max-layers", type=int, default=None, help="Layers the attack may perturb (default: all).")
    parser.add_argument("--max-heads", type=int, default=None,
                        help="Heads per layer the attack may perturb (default: all).")
    parser.add_argument("--seed", type=int, default=42, help="Seed of training and of the samples (default: 42).")
    return parser.parse_args(argv)


def accuracy(eval_prediction) -> dict[str, float]:
    predictions = np.argmax(eval_prediction.predictions, axis=-1)
    return {"accuracy": float((predictions == eval_prediction.label_ids).mean())}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    model_path = resolve_model_name_or_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    # Data: SST-2 tokenized without padding. The collator pads each batch.
    train = load_task_dataset("sst2", "train", data_dir=args.data_dir, limit=args.train_limit, seed=args.seed)
    dev = load_task_dataset("sst2", "dev", data_dir=args.data_dir, limit=args.eval_limit, seed=args.seed)
    train_inputs, dev_inputs = (
        encode_dataset(split, tokenizer, max_length=args.max_length).select_columns(MODEL_INPUTS)
        for split in (train, dev)
    )

    # Model: a LoRA adapter on the query and value projections. The new classifier head is trained in full.
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.1,
        target_modules=["query", "value"],
    )
    model = get_peft_model(base, lora_config)
    model.print_trainable_parameters()

    # Training: SAttendTrainer in place of Trainer, SAttendTrainingArguments in place of TrainingArguments.
    training_args = SAttendTrainingArguments(
        output_dir=str(output_dir / "adapter"),
        sattend_alpha=args.sattend_alpha,
        sattend_granularity=args.sattend_granularity,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=32,
        warmup_steps=0.06,
        seed=args.seed,
        save_strategy="no",
        report_to="none",
    )
    trainer = SAttendTrainer(
        model=model, args=training_args, train_dataset=train_inputs, eval_dataset=dev_inputs,
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(f"dev accuracy of the LoRA model: {metrics['eval_accuracy']:.3f} on {len(dev_inputs)} sentences")
    trainer.save_model()  # the adapter only
    trainer.create_model_card()  # Trainer's card plus the S-Attend settings

    # Merge: a plain checkpoint that from_pretrained, `attend-robust attack` and the Hub load directly.
    merged = model.merge_and_unload().eval()
    merged.save_pretrained(output_dir / "merged")
    tokenizer.save_pretrained(output_dir / "merged")

    # Attack the merged model and put the results into its model card.
    attack_set = load_task_dataset("sst2", "dev", data_dir=args.data_dir, limit=args.attack_limit, seed=args.seed)
    config = HackAttendConfig(
        alpha=args.alpha, max_layers=args.max_layers, max_heads=args.max_heads, max_length=args.max_length
    )
    evaluator = HackAttendEvaluator(
        merged, tokenizer, config, output_dir=output_dir / "attack",
        run_info={"model": str(output_dir / "merged"), "dataset": "sst2", "split": "dev"},
    )
    report = evaluator.evaluate(attack_set)
    # hub_model_id maps the packaged MiniLM back to its Hub name, and a local folder to None (no base_model).
    update_model_card(
        output_dir / "merged", hackattend_report=output_dir / "attack" / "report.json",
        base_model=hub_model_id(model_path),
    )

    print(format_report(report))
    print(f"adapter: {output_dir / 'adapter'}")
    print(f"merged model and card: {output_dir / 'merged'}")
    return report


if __name__ == "__main__":
    main()
