"""Count the decisions that the tie rule of the removal rankings changes on real victims.

`rank_removals` counts two layer or head removals as tied when the label's log-odds differ by at
most `REMOVAL_TIE_LOG_ODDS` (plus one float32 spacing), and orders tied removals by index. This
script runs `HackAttendSearch` twice on the same examples, once with that rule and once with exact
ordering (every difference counts), and prints, per task, how many examples differ in each
decision field.

    python scripts/acceptance/tie_rule_effect.py --sst2-model runs/victims/minilm-sst2 \\
        --dream-model runs/victims/minilm-dream-continued --examples 200
"""

from __future__ import annotations

import argparse
import collections

import torch
from transformers import AutoModelForMultipleChoice, AutoModelForSequenceClassification, AutoTokenizer

from attend_robust import AttentionMaskedModel
from attend_robust.data import load_task_dataset
from attend_robust.hackattend import HackAttendConfig, HackAttendEvaluator, HackAttendSearch
from attend_robust.hackattend import search as search_module

FIELDS = ("success", "queries", "layer_order", "perturbed_heads", "masked_units")


def tied_only_when_equal(first: float, second: float) -> bool:
    """Return whether two probabilities are equal: the exact ordering, without tolerance."""
    return first == second


def compare(task: str, model_path: str, count: int, data_dir: str) -> None:
    model_class = AutoModelForMultipleChoice if task == "dream" else AutoModelForSequenceClassification
    wrapped = AttentionMaskedModel(model_class.from_pretrained(model_path, attn_implementation="eager").eval())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = load_task_dataset(task, "dev", data_dir=data_dir)
    dataset = dataset.select(range(min(count, len(dataset))))
    config = HackAttendConfig(alpha=0.01)
    items = HackAttendEvaluator(wrapped, tokenizer, config, progress=False).search_inputs(dataset)

    with_rule = HackAttendSearch(wrapped, config).attack_many(items)
    rule = search_module.removals_tied
    search_module.removals_tied = tied_only_when_equal
    try:
        exact = HackAttendSearch(wrapped, config).attack_many(items)
    finally:
        search_module.removals_tied = rule

    by_field = collections.Counter()
    differing = 0
    for first, second in zip(with_rule, exact):
        fields = [name for name in FIELDS if getattr(first, name) != getattr(second, name)]
        by_field.update(fields)
        differing += bool(fields)
    attacked = sum(result.attacked for result in exact)
    print(f"{task}: {len(items)} examples, {attacked} attacked, {differing} differ; by field: "
          f"{', '.join(f'{name} {by_field[name]}' for name in FIELDS)}; successes {sum(r.success for r in with_rule)} "
          f"with the rule, {sum(r.success for r in exact)} exact")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data", help="folder with sst2/ and dream/")
    parser.add_argument("--sst2-model", help="fine-tuned SST-2 classifier; omit to skip SST-2")
    parser.add_argument("--dream-model", help="fine-tuned DREAM multiple-choice model; omit to skip DREAM")
    parser.add_argument("--examples", type=int, default=200, help="first dev examples of each task")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"REMOVAL_TIE_LOG_ODDS = {search_module.REMOVAL_TIE_LOG_ODDS:g}")
    for task, model_path in (("sst2", args.sst2_model), ("dream", args.dream_model)):
        if model_path:
            compare(task, model_path, args.examples, args.data_dir)


if __name__ == "__main__":
    main()
