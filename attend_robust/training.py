"""Fine-tuning a victim model on SST-2, DREAM or another dataset, with optional S-Attend masking.

The per-task defaults are the fine-tuning settings of Table 9 in Liong et al., "Unveiling Vulnerability
of Self-Attention" (LREC-COLING 2024). SST-2 uses learning rate 2e-5, batch 32, 3 epochs and warmup over
6% of the steps. DREAM uses 3e-5, batch 16, 8 epochs and 10% warmup. Both use maximum length 128.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import (
    CLASSIFICATION,
    encode_dataset,
    label_names_of,
    load_task_dataset,
    num_labels_of,
    resolve_data_dir,
    task_kind,
)
from .models import load_pretrained, resolve_model_name_or_path

logger = logging.getLogger(__name__)

FINETUNE_ARGS_FILE = "finetune_args.json"
EVAL_RESULTS_FILE = "eval_results.json"
SATTEND_GRANULARITIES = ("unit", "token")
# Columns the model receives. The collators cannot batch the text and id columns, so they are removed.
_MODEL_INPUT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "label")
# TrainingArguments fields that finetune sets from its own parameters.
_RESERVED_TRAINING_ARGS = frozenset({
    "output_dir", "num_train_epochs", "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
    "warmup_steps", "seed", "logging_steps", "save_strategy", "eval_strategy", "report_to", "sattend_alpha",
    "sattend_granularity",
})


@dataclass(frozen=True)
class FinetuneDefaults:
    """Fine-tuning hyperparameters of one task (Table 9 of Liong et al., 2024)."""

    learning_rate: float
    batch_size: int
    epochs: float
    warmup_ratio: float


TASK_DEFAULTS = {
    "sst2": FinetuneDefaults(learning_rate=2e-5, batch_size=32, epochs=3, warmup_ratio=0.06),
    "dream": FinetuneDefaults(learning_rate=3e-5, batch_size=16, epochs=8, warmup_ratio=0.1),
}


def finetune_defaults(dataset_name: str) -> FinetuneDefaults:
    """Return the Table 9 settings of `sst2` or `dream`, and the SST-2 settings for any other dataset."""
    key = dataset_name.strip().lower().replace("-", "")
    return TASK_DEFAULTS.get(key, TASK_DEFAULTS["sst2"])


def _compute_accuracy(eval_prediction) -> dict[str, float]:
    # logits: [N, num_labels] for classification or [N, C] for multiple choice.
    logits = eval_prediction.predictions
    if isinstance(logits, tuple):
        logits = logits[0]
    predictions = np.argmax(logits, axis=-1)
    return {"accuracy": float((predictions == eval_prediction.label_ids).mean())}


def _check_finetune_arguments(*, dataset_name: str, epochs, learning_rate, batch_size, warmup_ratio, max_length,
                              sattend_alpha, sattend_granularity, train_limit, eval_limit, logging_steps) -> None:
    if Path(dataset_name).expanduser().is_file():
        raise ValueError(
            f"Dataset {dataset_name!r} is a single file, but fine-tuning needs a train split and a dev split. "
            f"Pass a folder that contains train.<ext> and dev.<ext> (csv, tsv, json or jsonl)."
        )
    if epochs is not None and not epochs > 0:
        raise ValueError(f"epochs must be positive, not {epochs!r}.")
    if learning_rate is not None and not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, not {learning_rate!r}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}.")
    if warmup_ratio is not None and not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio is a fraction of the training steps in [0, 1), not {warmup_ratio!r}.")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, not {max_length!r}.")
    if not 0 <= sattend_alpha < 1:
        raise ValueError(
            f"sattend_alpha is the probability of masking an attention unit or token in [0, 1), not "
            f"{sattend_alpha!r}. Use 0 to train without S-Attend."
        )
    if sattend_granularity not in SATTEND_GRANULARITIES:
        raise ValueError(
            f"sattend_granularity must be one of {list(SATTEND_GRANULARITIES)}, not {sattend_granularity!r}."
        )
    for name, limit in (("train_limit", train_limit), ("eval_limit", eval_limit)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"{name} must be a positive number of examples or None, not {limit!r}.")
    if isinstance(logging_steps, bool) or not isinstance(logging_steps, int) or logging_steps < 1:
        raise ValueError(f"logging_steps must be a positive integer, not {logging_steps!r}.")


def _load_model(model_path: str, train_dataset, kind: str):
    from transformers import AutoModelForMultipleChoice, AutoModelForSequenceClassification

    # ignore_mismatched_sizes gives a new head to a checkpoint that already has one of another shape, for
    # example an SST-2 classifier loaded for DREAM. transformers logs which weights it re-initialized.
    if kind == CLASSIFICATION:
        num_labels = num_labels_of(train_dataset)
        names = label_names_of(train_dataset) or [f"LABEL_{index}" for index in range(num_labels)]
        return load_pretrained(
            AutoModelForSequenceClassification.from_pretrained,
            model_path,
            num_labels=num_labels,
            id2label=dict(enumerate(names)),
            label2id={name: index for index, name in enumerate(names)},
            ignore_mismatched_sizes=True,
        )
    # A multiple-choice head scores each choice with one logit, so it has no num_labels.
    return load_pretrained(AutoModelForMultipleChoice.from_pretrained, model_path, ignore_mismatched_sizes=True)


def _model_inputs(encoded):
    return encoded.remove_columns([column for column in encoded.column_names if column not in _MODEL_INPUT_COLUMNS])


def _version_info() -> dict[str, str]:
    import datasets
    import torch
    import transformers

    from ._version import __version__

    return {
        "attend_robust": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "datasets": datasets.__version__,
    }


def finetune(
    model_name_or_path: str,
    dataset_name: str,
    output_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    epochs: float | None = None,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    warmup_ratio: float | None = None,
    max_length: int = 128,
    seed: int = 42,
    sattend_alpha: float = 0.0,
    sattend_granularity: str = "unit",
    logging_steps: int = 50,
    **extra_training_args: Any,
) -> dict[str, Any]:
    """Fine-tune a pretrained encoder on a dataset's train split and evaluate it on the dev split.

    A classification dataset gets an `AutoModelForSequenceClassification` head and a multiple-choice
    dataset an `AutoModelForMultipleChoice` head. Batches are padded per batch. The run saves the model
    and tokenizer, `finetune_args.json` (every setting after defaults are filled in, dataset sizes and
    library versions) and `eval_results.json` (dev accuracy and loss) to `output_dir`. No checkpoints are
    written during training.

    With `sattend_alpha > 0` the model is trained with S-Attend: `SAttendTrainer` and
    `SAttendTrainingArguments` from `attend_robust.sattend` mask attention at random during training only.

    Args:
        model_name_or_path (`str`):
            A local folder or hub name, resolved by [`resolve_model_name_or_path`] (`minilm` is the packaged
            all-MiniLM-L6-v2).
        dataset_name (`str`):
            `sst2`, `dream`, a folder with `train.<ext>` and `dev.<ext>` files, or a hub dataset name; see
            [`load_task_dataset`].
        output_dir (`str` or `os.PathLike`):
            Folder for the model, tokenizer and JSON files. Created when missing.
        data_dir (`str` or `os.PathLike`, *optional*):
            Folder with local copies of SST-2 and DREAM; see [`resolve_data_dir`].
        train_limit (`int`, *optional*):
            Train on a seeded random subset of this many examples (questions, for multiple choice).
        eval_limit (`int`, *optional*):
            Evaluate on a seeded random subset of this many dev examples (questions, for multiple choice).
        epochs (`float`, *optional*):
            Number of training epochs. Defaults to the task's Table 9 value (SST-2 3, DREAM 8).
        learning_rate (`float`, *optional*):
            Peak learning rate of AdamW with linear decay. Defaults to SST-2 2e-5, DREAM 3e-5.
        batch_size (`int`, *optional*):
            Examples per training and evaluation batch. Defaults to SST-2 32, DREAM 16.
        warmup_ratio (`float`, *optional*):
            Fraction of the training steps with linear warmup, in `[0, 1)`. Defaults to SST-2 0.06, DREAM 0.1.
        max_length (`int`, *optional*, defaults to 128):
            Maximum sequence length in tokens; longer inputs are truncated and counted.
        seed (`int`, *optional*, defaults to 42):
            Seed of the head initialization, data order, S-Attend masks and the `limit` subsets.
        sattend_alpha (`float`, *optional*, defaults to 0.0):
            S-Attend masking probability in `[0, 1)`; 0 trains with the plain `Trainer`.
        sattend_granularity (`str`, *optional*, defaults to `"unit"`):
            `"unit"` masks single attention weights, `"token"` masks whole key tokens for every layer and head.
        logging_steps (`int`, *optional*, defaults to 50):
            Log the training loss every this many optimizer steps.
        extra_training_args:
            Further `TrainingArguments` fields, for example `weight_decay=0.01` or `use_cpu=True`.

    Returns:
        `dict`: `output_dir`, the dev metrics (`eval_accuracy`, `eval_loss`, ...), `train_loss`,
        `train_runtime` (seconds), `wall_time_s`, and the number of train and dev examples and of
        truncated ones.
    """
    import torch
    import transformers
    from transformers import (
        AutoTokenizer,
        DataCollatorForMultipleChoice,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    _check_finetune_arguments(
        dataset_name=dataset_name, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
        warmup_ratio=warmup_ratio, max_length=max_length, sattend_alpha=sattend_alpha,
        sattend_granularity=sattend_granularity, train_limit=train_limit, eval_limit=eval_limit,
        logging_steps=logging_steps,
    )
    clashes = sorted(_RESERVED_TRAINING_ARGS & set(extra_training_args))
    if clashes:
        raise ValueError(
            f"Training arguments {clashes} are set by finetune itself. Pass them through finetune's own "
            f"parameters (epochs, learning_rate, batch_size, warmup_ratio, seed, logging_steps, sattend_alpha, "
            f"sattend_granularity, output_dir)."
        )
    defaults = finetune_defaults(dataset_name)
    settings = {
        "epochs": defaults.epochs if epochs is None else epochs,
        "learning_rate": defaults.learning_rate if learning_rate is None else learning_rate,
        "batch_size": defaults.batch_size if batch_size is None else batch_size,
        "warmup_ratio": defaults.warmup_ratio if warmup_ratio is None else warmup_ratio,
    }
    output_dir = Path(output_dir).expanduser()
    started = time.perf_counter()

    # Data: train and dev splits, tokenized without padding.
    model_path = resolve_model_name_or_path(model_name_or_path)
    resolved_data_dir = resolve_data_dir(data_dir)
    train_raw = load_task_dataset(dataset_name, "train", data_dir=resolved_data_dir, limit=train_limit, seed=seed)
    eval_raw = load_task_dataset(dataset_name, "dev", data_dir=resolved_data_dir, limit=eval_limit, seed=seed)
    kind = task_kind(train_raw)
    logger.info("Fine-tuning %s on %s (%s): %d train and %d dev examples, settings %s.", model_path,
                dataset_name, kind, len(train_raw), len(eval_raw), settings)

    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model_name_or_path, model_path)
    train_encoded = encode_dataset(train_raw, tokenizer, max_length=max_length)
    eval_encoded = encode_dataset(eval_raw, tokenizer, max_length=max_length)

    # Model: the head is initialized from `seed`.
    transformers.set_seed(seed)
    model = _load_model(model_path, train_raw, kind)
    if kind == CLASSIFICATION:
        collator = DataCollatorWithPadding(tokenizer)
    else:
        collator = DataCollatorForMultipleChoice(tokenizer)  # pads to [B, C, S]

    # Trainer: plain, or S-Attend when alpha > 0.
    fixed = {
        "output_dir": str(output_dir),
        "num_train_epochs": settings["epochs"],
        "learning_rate": settings["learning_rate"],
        "per_device_train_batch_size": settings["batch_size"],
        "per_device_eval_batch_size": settings["batch_size"],
        # A float in [0, 1) is read as a fraction of the training steps by transformers 5.
        "warmup_steps": settings["warmup_ratio"],
        "seed": seed,
        "logging_steps": logging_steps,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        # Pinned memory only speeds up copies to an accelerator; on CPU, torch warns about it.
        "dataloader_pin_memory": torch.accelerator.is_available(),
    }
    arguments_class, trainer_class = TrainingArguments, Trainer
    if sattend_alpha > 0:
        from .sattend import SAttendTrainer, SAttendTrainingArguments

        arguments_class, trainer_class = SAttendTrainingArguments, SAttendTrainer
        fixed["sattend_alpha"] = sattend_alpha
        fixed["sattend_granularity"] = sattend_granularity
    training_args = arguments_class(**fixed, **extra_training_args)
    trainer = trainer_class(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=_model_inputs(train_encoded),
        eval_dataset=_model_inputs(eval_encoded),
        processing_class=tokenizer,
        compute_metrics=_compute_accuracy,
    )

    train_output = trainer.train()
    eval_metrics = trainer.evaluate()
    logger.info("Dev accuracy %.4f on %d examples.", eval_metrics["eval_accuracy"], len(eval_encoded))

    # Outputs: model, tokenizer and the two JSON files.
    trainer.save_model(str(output_dir))
    wall_time = time.perf_counter() - started
    summary = {
        "output_dir": str(output_dir),
        **eval_metrics,
        "train_loss": train_output.training_loss,
        "train_runtime": train_output.metrics.get("train_runtime"),
        "wall_time_s": wall_time,
        "train_examples": len(train_encoded),
        "eval_examples": len(eval_encoded),
        "train_truncated": int(sum(train_encoded["truncated"][:])),
        "eval_truncated": int(sum(eval_encoded["truncated"][:])),
    }
    recorded_args = {
        "model_name_or_path": model_name_or_path,
        "resolved_model_path": model_path,
        "dataset_name": dataset_name,
        "data_dir": str(resolved_data_dir.resolve()) if resolved_data_dir else None,
        "task_kind": kind,
        "train_limit": train_limit,
        "eval_limit": eval_limit,
        **settings,
        "table9_defaults": asdict(defaults),
        "max_length": max_length,
        "seed": seed,
        "sattend_alpha": sattend_alpha,
        "sattend_granularity": sattend_granularity,
        "logging_steps": logging_steps,
        "extra_training_args": extra_training_args,
        "train_examples": summary["train_examples"],
        "eval_examples": summary["eval_examples"],
        "versions": _version_info(),
    }
    (output_dir / FINETUNE_ARGS_FILE).write_text(json.dumps(recorded_args, indent=2, default=str) + "\n")
    (output_dir / EVAL_RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("Saved the model, tokenizer, %s and %s to %s (%.0f s).", FINETUNE_ARGS_FILE, EVAL_RESULTS_FILE,
                output_dir, wall_time)
    return summary


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _run_finetune_command(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = finetune(
        args.model,
        args.dataset,
        args.output_dir,
        data_dir=args.data_dir,
        train_limit=args.train_limit,
        eval_limit=args.eval_limit,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        warmup_ratio=args.warmup_ratio,
        max_length=args.max_length,
        seed=args.seed,
        sattend_alpha=args.sattend_alpha,
        sattend_granularity=args.sattend_granularity,
        logging_steps=args.logging_steps,
    )
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def add_finetune_command(subparsers) -> argparse.ArgumentParser:
    """Register the `finetune` subcommand on the `attend-robust` parser's subparsers and return its parser."""
    parser = subparsers.add_parser(
        "finetune",
        help="Fine-tune a victim model on a dataset's train split and evaluate it on the dev split.",
        description=(
            "Fine-tune a pretrained encoder for classification or multiple choice with the settings of "
            "Table 9 of Liong et al., LREC-COLING 2024 (SST-2: lr 2e-5, batch 32, 3 epochs, warmup 0.06. "
            "DREAM: lr 3e-5, batch 16, 8 epochs, warmup 0.1. Other datasets: SST-2's), then write the model, "
            "tokenizer, finetune_args.json and eval_results.json to --output-dir."
        ),
    )
    # What to train, on which data, and where the result goes.
    parser.add_argument("--model", required=True,
                        help="Pretrained model: a local folder, a hub name, or 'minilm' for the packaged "
                             "all-MiniLM-L6-v2.")
    parser.add_argument("--dataset", required=True,
                        help="'sst2', 'dream', a folder with train.<ext> and dev.<ext> (csv, tsv, json, jsonl), "
                             "or a hub dataset name.")
    parser.add_argument("--output-dir", required=True,
                        help="Folder for the fine-tuned model, tokenizer and JSON results (created if missing).")
    parser.add_argument("--data-dir", default=None,
                        help="Folder with local copies sst2/ and dream/. Default: $ATTEND_ROBUST_DATA_DIR, else "
                             "../shared/data if it exists, else the Hugging Face Hub.")

    # Dataset sizes.
    parser.add_argument("--train-limit", type=_positive_int, default=None,
                        help="Train on a seeded random subset of this many examples (questions for multiple "
                             "choice). Default: the whole train split.")
    parser.add_argument("--eval-limit", type=_positive_int, default=None,
                        help="Evaluate on a seeded random subset of this many dev examples. Default: the whole "
                             "dev split.")

    # Optimisation. Defaults come from the task's Table 9 settings.
    parser.add_argument("--epochs", type=float, default=None,
                        help="Number of training epochs. Default: the task's Table 9 value (SST-2 3, DREAM 8).")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="Peak learning rate of AdamW with linear decay. Default: SST-2 2e-5, DREAM 3e-5.")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="Examples per training and evaluation batch. Default: SST-2 32, DREAM 16.")
    parser.add_argument("--warmup-ratio", type=float, default=None,
                        help="Fraction of the training steps with linear warmup, in [0, 1). Default: SST-2 0.06, "
                             "DREAM 0.1.")
    parser.add_argument("--max-length", type=_positive_int, default=128,
                        help="Maximum sequence length in tokens; longer inputs are truncated (default: 128).")
    parser.add_argument("--seed", type=int, default=42,
                        help="Random seed of the head initialization, data order, masks and subsets (default: 42).")

    # S-Attend and logging.
    parser.add_argument("--sattend-alpha", type=float, default=0.0,
                        help="S-Attend masking probability in [0, 1) during training; 0 disables S-Attend "
                             "(default: 0).")
    parser.add_argument("--sattend-granularity", choices=SATTEND_GRANULARITIES, default="unit",
                        help="What S-Attend masks: 'unit' masks single attention weights, 'token' masks whole "
                             "key tokens in every layer and head (default: unit).")
    parser.add_argument("--logging-steps", type=_positive_int, default=50,
                        help="Log the training loss every this many optimizer steps (default: 50).")

    parser.set_defaults(func=_run_finetune_command)
    return parser
