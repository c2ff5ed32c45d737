"""Time a forward pass of all-MiniLM-L6-v2 wrapped with an all-keep unit mask against unwrapped eager.

Both variants run on the same SST-2 dev batches, interleaved batch by batch within one process,
so machine load affects them alike. The figure is the ratio of total times (wrapped / unwrapped);
the target is at most 1.10 (10% overhead).

    python benchmarks/bench_masked_forward.py --data-dir ../shared/data --batch-size 32 --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from attend_robust import AttentionMaskedModel
from attend_robust.models import resolve_model_name_or_path

TARGET_RATIO = 1.10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="model name or path")
    parser.add_argument("--data-dir", default="../shared/data", help="folder that contains sst2/dev.tsv")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the dev set per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--output", type=Path, default=None, help="write the result as JSON to this file")
    return parser.parse_args()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_name_or_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="eager")
    model = model.to(args.device).eval()

    with open(Path(args.data_dir) / "sst2" / "dev.tsv", newline="", encoding="utf-8") as handle:
        sentences = [row["text"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    batches = [
        tokenizer(sentences[i : i + args.batch_size], padding=True, return_tensors="pt").to(args.device)
        for i in range(0, len(sentences), args.batch_size)
    ]
    wrapped = AttentionMaskedModel(model)
    keeps = [
        torch.ones(wrapped.num_layers, wrapped.num_heads, b["input_ids"].shape[1], b["input_ids"].shape[1],
                   dtype=torch.bool, device=args.device)
        for b in batches
    ]

    def run_unwrapped(batch, keep):
        with wrapped._temporarily_unwrapped():
            return model(**batch)

    def run_wrapped(batch, keep):
        return wrapped(**batch, unit_mask=keep)

    variants = {"unwrapped_eager": run_unwrapped, "wrapped_all_keep": run_wrapped}
    totals = {name: [] for name in variants}
    with torch.inference_mode():
        for batch, keep in zip(batches[:2], keeps[:2]):  # warm-up
            for run in variants.values():
                run(batch, keep)
        for _ in range(args.repeats):
            elapsed = dict.fromkeys(variants, 0.0)
            for batch, keep in zip(batches, keeps):
                for name, run in variants.items():
                    synchronize(args.device)
                    start = time.perf_counter()
                    run(batch, keep)
                    synchronize(args.device)
                    elapsed[name] += time.perf_counter() - start
            for name, seconds in elapsed.items():
                totals[name].append(seconds)

    ratios = [w / u for w, u in zip(totals["wrapped_all_keep"], totals["unwrapped_eager"])]
    result = {
        "model": args.model,
        "device": args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "machine": platform.machine(),
        "torch": torch.__version__,
        "sentences": len(sentences),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seconds_per_pass": {name: [round(s, 3) for s in seconds] for name, seconds in totals.items()},
        "ratio_per_pass": [round(r, 3) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "target_ratio": TARGET_RATIO,
    }
    result["meets_target"] = result["ratio_median"] <= TARGET_RATIO
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
