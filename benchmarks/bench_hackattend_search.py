"""Time the HackAttend search against the sequential search on the same victims and examples.

For each task, one process runs two searches. (a) `SequentialHackAttendSearch` evaluates every
layer removal, head removal and query as its own forward pass of one copy of the example through
the whole model, the way a plain implementation of Algorithm 1 does. (b) `HackAttendSearch`
searches examples of one shape together, starts every pass at its lowest perturbed block, and
runs the last layer for the first position only. The script checks that both take every decision
alike (success, queries, perturbed heads, masked units, layer order). It reports examples per
second, the throughput ratio, attention-layer evaluations per example against the minimum these
decisions need, and peak memory. It also splits each search's time into its clean and saliency
passes, which both searches need in full, and the rankings and queries. So it shows the ratio the
optimised search would reach if its rankings and queries cost nothing.

Both searches run in the same process, one after the other, and the script records wall time and
process CPU time for each. With one torch thread on a machine shared with other jobs, the CPU-time
ratio is the steadier figure. Targets on 2 CPU cores: a throughput ratio of at least 5, and layer
evaluations at most 1.5 times the minimum. On a GPU, the time per successful example is the figure
to set beside Table 4 of Liong et al., "Unveiling Vulnerability of Self-Attention" (LREC-COLING
2024). That table gives 0.6 to 0.7 s on DREAM and ReClor, and 23.8 s on SST-2, for BERT-base on
a TITAN RTX.

    python benchmarks/bench_hackattend_search.py --data-dir ../shared/data \\
        --sst2-model runs/victims/minilm-sst2 --dream-model runs/victims/minilm-dream-continued \\
        --sst2-examples 200 --dream-examples 100 --output benchmarks/results-hackattend-search-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForMultipleChoice, AutoModelForSequenceClassification, AutoTokenizer

from attend_robust import AttentionMaskedModel
from attend_robust.data import load_task_dataset
from attend_robust.hackattend import HackAttendConfig, HackAttendEvaluator, HackAttendSearch
from attend_robust.hackattend.search import PhaseTimes, minimum_layer_evaluations
from attend_robust.hackattend.sequential import SequentialHackAttendSearch

TARGET_THROUGHPUT_RATIO = 5.0
TARGET_LAYER_RATIO = 1.5
CLEAN_PHASE = "clean and saliency"
DECISIONS = (
    "clean_prediction", "attacked", "success", "queries", "model_evaluations", "perturbed_heads", "masked_units",
    "layer_order",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data", help="folder with sst2/ and dream/")
    parser.add_argument("--sst2-model", help="fine-tuned SST-2 classifier (folder or hub name); omit to skip SST-2")
    parser.add_argument("--dream-model", help="fine-tuned DREAM multiple-choice model; omit to skip DREAM")
    parser.add_argument("--sst2-examples", type=int, default=200, help="first SST-2 dev sentences to attack")
    parser.add_argument("--dream-examples", type=int, default=100, help="first DREAM dev questions to attack")
    parser.add_argument("--alpha", type=float, default=0.01, help="HackAttend alpha")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON to this file")
    return parser.parse_args()


class PeakMemory:
    """Peak resident memory of this process (CPU) or peak allocated device memory (CUDA) over a block."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _resident_bytes(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_bytes = max(self.peak_bytes, self._resident_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak_bytes = self._resident_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def phase_summary(seconds: float, cpu_seconds: float, examples: int, successes: int, layer_evaluations: list[int],
                  memory: PeakMemory, phases: PhaseTimes) -> dict:
    """Summarize one search's run: times, throughput, layer evaluations per example, peak memory, phases."""
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "examples_per_second": examples / seconds,
        "seconds_per_success": seconds / successes if successes else None,
        "layer_evaluations_per_example": statistics.mean(layer_evaluations),
        "peak_memory_mib": memory.peak_bytes / 2**20,
        "phase_seconds": dict(phases.seconds),
    }


def run_task(task: str, model_path: str, count: int, args: argparse.Namespace) -> dict:
    model_class = AutoModelForMultipleChoice if task == "dream" else AutoModelForSequenceClassification
    model = model_class.from_pretrained(model_path, attn_implementation="eager").to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    wrapped = AttentionMaskedModel(model)
    dataset = load_task_dataset(task, "dev", data_dir=args.data_dir)
    dataset = dataset.select(range(min(count, len(dataset))))
    config = HackAttendConfig(alpha=args.alpha)
    evaluator = HackAttendEvaluator(wrapped, tokenizer, config, progress=False)
    items = evaluator.search_inputs(dataset)
    resolved = evaluator.config

    def synchronize() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    sequential = SequentialHackAttendSearch(wrapped, config)
    with PeakMemory(args.device) as sequential_memory:
        started, started_cpu = time.perf_counter(), time.process_time()
        sequential_results = []
        for number, item in enumerate(items, start=1):
            sequential_results.append(sequential.attack(*item))
            if number % 25 == 0:
                print(f"  {task} sequential: {number}/{len(items)} examples", file=sys.stderr, flush=True)
        synchronize()
        sequential_seconds = time.perf_counter() - started
        sequential_cpu = time.process_time() - started_cpu

    search = HackAttendSearch(wrapped, config)
    with PeakMemory(args.device) as fast_memory:
        started, started_cpu = time.perf_counter(), time.process_time()
        fast_results = search.attack_many(items)
        synchronize()
        fast_seconds = time.perf_counter() - started
        fast_cpu = time.process_time() - started_cpu

    sequential_clean = sequential.phases.seconds.get(CLEAN_PHASE, 0.0)
    fast_clean = search.phases.seconds.get(CLEAN_PHASE, 0.0)
    mismatches = []
    for (_, _, example_id), first, second in zip(items, fast_results, sequential_results):
        differing = [name for name in DECISIONS if getattr(first, name) != getattr(second, name)]
        if differing:
            mismatches.append({"example_id": example_id, "fields": differing})

    minimum = [
        minimum_layer_evaluations(resolved, wrapped.num_layers, wrapped.num_heads, wrapped.attention_layers_per_block,
                                  result.attacked, result.perturbed_heads)
        for result in fast_results
    ]
    fast_layers = [result.layer_evaluations for result in fast_results]
    sequential_layers = [result.layer_evaluations for result in sequential_results]
    successes = sum(result.success for result in fast_results)
    attacked = sum(result.attacked for result in fast_results)
    return {
        "task": task,
        "model": model_path,
        "examples": len(items),
        "attacked": attacked,
        "successes": successes,
        "attack_success_rate": successes / attacked if attacked else None,
        "mean_queries": statistics.mean(r.queries for r in fast_results if r.attacked) if attacked else None,
        "decision_mismatches": mismatches,
        "sequential": phase_summary(sequential_seconds, sequential_cpu, len(items), successes, sequential_layers,
                                    sequential_memory, sequential.phases),
        "optimised": phase_summary(fast_seconds, fast_cpu, len(items), successes, fast_layers, fast_memory,
                                   search.phases),
        "minimum_layer_evaluations_per_example": statistics.mean(minimum),
        "throughput_ratio": sequential_seconds / fast_seconds,
        # Rankings and queries alone, and the ratio a search would reach if they cost nothing.
        "search_phase_ratio": (sequential_seconds - sequential_clean) / (fast_seconds - fast_clean),
        "ceiling_ratio": sequential_seconds / fast_clean,
        "cpu_time_ratio": sequential_cpu / fast_cpu,
        "layer_evaluations_over_minimum": sum(fast_layers) / sum(minimum),
        "sequential_layer_evaluations_over_minimum": sum(sequential_layers) / sum(minimum),
        "config": resolved.to_dict(),
    }


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [(task, path, count) for task, path, count in (
        ("sst2", args.sst2_model, args.sst2_examples), ("dream", args.dream_model, args.dream_examples)) if path]
    if not tasks:
        raise SystemExit("Name at least one victim with --sst2-model or --dream-model.")
    results = []
    for task, path, count in tasks:
        print(f"{task}: attacking {count} dev examples of {path}", file=sys.stderr, flush=True)
        results.append(run_task(task, path, count, args))

    print("| task | examples | ASR | sequential ex/s | optimised ex/s | ratio | CPU-time ratio | layer evals / "
          "example (sequential, optimised, minimum) | optimised / minimum | peak MiB (seq., opt.) | decisions differ |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        seq, opt = r["sequential"], r["optimised"]
        asr = "n/a" if r["attack_success_rate"] is None else f"{100 * r['attack_success_rate']:.1f}%"
        print(f"| {r['task']} | {r['examples']} | {asr} | {seq['examples_per_second']:.3f} | "
              f"{opt['examples_per_second']:.3f} | {r['throughput_ratio']:.2f} | {r['cpu_time_ratio']:.2f} | "
              f"{seq['layer_evaluations_per_example']:.0f}, {opt['layer_evaluations_per_example']:.0f}, "
              f"{r['minimum_layer_evaluations_per_example']:.0f} | {r['layer_evaluations_over_minimum']:.3f} | "
              f"{seq['peak_memory_mib']:.0f}, {opt['peak_memory_mib']:.0f} | {len(r['decision_mismatches'])} |")
    print()
    print("| task | clean and saliency s (seq., opt.) | rankings and queries s (seq., opt.) | rankings and queries "
          "ratio | ratio if rankings and queries were free |")
    print("|---|---|---|---|---|")
    for r in results:
        seq, opt = r["sequential"], r["optimised"]
        seq_clean, opt_clean = seq["phase_seconds"].get(CLEAN_PHASE, 0.0), opt["phase_seconds"].get(CLEAN_PHASE, 0.0)
        print(f"| {r['task']} | {seq_clean:.1f}, {opt_clean:.1f} | {seq['seconds'] - seq_clean:.1f}, "
              f"{opt['seconds'] - opt_clean:.1f} | {r['search_phase_ratio']:.2f} | {r['ceiling_ratio']:.2f} |")
    if args.output:
        machine = {
            "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        payload = {"machine": machine, "results": results}
        args.output.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    met = all(
        r["throughput_ratio"] >= TARGET_THROUGHPUT_RATIO and r["layer_evaluations_over_minimum"] <= TARGET_LAYER_RATIO
        for r in results
    )
    print(f"targets (throughput >= {TARGET_THROUGHPUT_RATIO}x, layer evaluations <= {TARGET_LAYER_RATIO}x the "
          f"minimum): {'met' if met else 'NOT met'}")
    return 1 if any(r["decision_mismatches"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
