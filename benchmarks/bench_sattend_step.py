"""Time SAttendTrainer's training step against plain Trainer's on all-MiniLM-L6-v2 and SST-2 sentences.

Each variant has its own copy of the same initial model and runs `training_step` (forward, loss,
backward) followed by the optimizer step on the same batches. The variants are plain Trainer with
the model's default attention (sdpa), plain Trainer with eager attention, and SAttendTrainer at unit
and at token granularity. SAttendTrainer computes masked attention eagerly, so the ratio to plain
eager isolates the cost of the masks, and the ratio to plain sdpa is the cost that a user pays.
The variants are interleaved batch by batch within one process, in an order that rotates every
batch, so machine load affects them alike. The figure is the ratio of total step
times (S-Attend / plain) after the warm-up batches; the target is at most 1.05 (5% slower). Both wall
time and the process's CPU time are recorded. With one thread (OMP_NUM_THREADS=1), CPU time is far
less disturbed by other programs on a shared machine than wall time.

    OMP_NUM_THREADS=1 python benchmarks/bench_sattend_step.py --data-dir ../shared/data --steps 30
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from attend_robust.models import resolve_model_name_or_path
from attend_robust.sattend import SAttendTrainer, SAttendTrainingArguments

TARGET_RATIO = 1.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="model name or path (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--data-dir", default="../shared/data", help="folder that contains sst2/train.tsv")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per training step")
    parser.add_argument("--max-length", type=int, default=128, help="maximum tokens per sentence")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps per variant first")
    parser.add_argument("--alpha", type=float, default=0.1, help="S-Attend masking probability")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=None, help="write the result as JSON to this file")
    return parser.parse_args()


def load_sentences(data_dir: Path, count: int) -> Dataset:
    path = data_dir / "sst2" / "train.tsv"
    with path.open(encoding="utf-8", newline="") as handle:
        rows = [row for _, row in zip(range(count), csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))]
    return Dataset.from_dict({"text": [row["text"] for row in rows], "label": [int(row["label"]) for row in rows]})


def build_trainer(name: str, model_path: str, initial_state: dict, dataset: Dataset, tokenizer, args) -> Trainer:
    attention = {"attn_implementation": "eager"} if name == "plain-eager" else {}
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2, **attention)
    model.load_state_dict(initial_state)
    common = dict(output_dir=tempfile.mkdtemp(prefix=f"bench-{name}-"), per_device_train_batch_size=args.batch_size,
                  learning_rate=2e-5, report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(),
                  disable_tqdm=True, seed=0)
    if name.startswith("plain"):
        trainer: Trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset,
                                   data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    else:
        granularity = name.split("-")[1]
        training_args = SAttendTrainingArguments(**common, sattend_alpha=args.alpha, sattend_granularity=granularity)
        trainer = SAttendTrainer(model=model, args=training_args, train_dataset=dataset,
                                 data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.warmup + args.steps)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this script replaces
    trainer.model.train()
    return trainer


def run_step(trainer: Trainer, batch: dict) -> tuple[float, float]:
    """Run one training step and return its wall time and the process's CPU time, in seconds."""
    device = trainer.args.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    started, started_cpu = time.perf_counter(), time.process_time()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.model.zero_grad()
    trainer.state.global_step += 1  # the masks of the next step differ, as in training
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, time.process_time() - started_cpu


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = resolve_model_name_or_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    total_steps = args.warmup + args.steps
    sentences = load_sentences(Path(args.data_dir), total_steps * args.batch_size)
    dataset = sentences.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=args.max_length),
                            batched=True, remove_columns=["text"])
    initial_state = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2).state_dict()

    names = ["plain", "plain-eager", "sattend-unit", "sattend-token"]
    trainers = {name: build_trainer(name, model_path, initial_state, dataset, tokenizer, args) for name in names}
    # All variants train on the same batches, taken in dataset order without shuffling.
    collator = DataCollatorWithPadding(tokenizer)
    batches = [
        collator([dataset[i] for i in range(start, start + args.batch_size)])
        for start in range(0, total_steps * args.batch_size, args.batch_size)
    ]
    batches = [{("labels" if key == "label" else key): value for key, value in batch.items()} for batch in batches]

    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    for step, batch in enumerate(batches):
        order = names[step % len(names):] + names[: step % len(names)]
        for name in order:
            elapsed, elapsed_cpu = run_step(trainers[name], dict(batch))
            if step >= args.warmup:
                times[name].append(elapsed)
                cpu_times[name].append(elapsed_cpu)

    plain_total = sum(times["plain"])
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "mean_tokens_per_batch": statistics.mean(int(b["attention_mask"].sum()) for b in batches[args.warmup:]),
        "mean_padded_length": statistics.mean(b["input_ids"].shape[1] for b in batches[args.warmup:]),
        "timed_steps": args.steps,
        "alpha": args.alpha,
        "threads": torch.get_num_threads(),
        "device": str(trainers["plain"].args.device),
        "plain_attn_implementation": trainers["plain"].model.config._attn_implementation,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "processor": platform.processor() or platform.machine(),
        "target_ratio": TARGET_RATIO,
    }
    for name in names:
        result[f"{name}_mean_step_s"] = statistics.mean(times[name])
        result[f"{name}_median_step_s"] = statistics.median(times[name])
    for name in names[1:]:
        result[f"{name}_ratio"] = sum(times[name]) / plain_total
        result[f"{name}_median_of_step_ratios"] = statistics.median(
            masked / plain for masked, plain in zip(times[name], times["plain"])
        )
    eager_total = sum(times["plain-eager"])
    for name in ("sattend-unit", "sattend-token"):
        result[f"{name}_ratio_to_eager"] = sum(times[name]) / eager_total
    for name in names:
        result[f"{name}_mean_step_cpu_s"] = statistics.mean(cpu_times[name])
    for name in names[1:]:
        result[f"{name}_cpu_ratio"] = sum(cpu_times[name]) / sum(cpu_times["plain"])
    for name in ("sattend-unit", "sattend-token"):
        result[f"{name}_cpu_ratio_to_eager"] = sum(cpu_times[name]) / sum(cpu_times["plain-eager"])
    print(json.dumps(result, indent=2))
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
