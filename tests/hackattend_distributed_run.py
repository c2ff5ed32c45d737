"""Run by `accelerate launch` in test_hackattend_distributed.py: the attack command on two local files.

Usage: hackattend_distributed_run.py MODEL_DIR OUTPUT_ROOT DATA_FILE...

For each DATA_FILE it runs `attend-robust attack` into OUTPUT_ROOT/<file stem>, and once more without
an output folder, where rank 0 writes the gathered records to OUTPUT_ROOT/<file stem>.gathered.jsonl.
"""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate import Accelerator

from attend_robust.cli import main
from attend_robust.data import load_task_dataset
from attend_robust.hackattend import HackAttendConfig
from attend_robust.hackattend.evaluator import HackAttendEvaluator

ATTACK_OPTIONS = ["--alpha", "0.2", "--query-batch-size", "3", "--no-progress"]


def run(model_dir: str, output_root: str, data_files: list[str]) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for data_file in data_files:
        stem = Path(data_file).stem
        main(["attack", "--model", model_dir, "--dataset", data_file, "--output-dir",
              str(Path(output_root) / stem), *ATTACK_OPTIONS])

        model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
        evaluator = HackAttendEvaluator(model, AutoTokenizer.from_pretrained(model_dir),
                                        HackAttendConfig(alpha=0.2, query_batch_size=3), progress=False)
        evaluator.evaluate(load_task_dataset(data_file, "dev"))
        if Accelerator().is_main_process:
            lines = "".join(record.to_json() + "\n" for record in evaluator.records)
            (Path(output_root) / f"{stem}.gathered.jsonl").write_text(lines, encoding="utf-8")


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3:])
    # Wait for every process, then destroy the process group, because a process that exits while
    # another still works in the group can abort at interpreter exit.
    Accelerator().wait_for_everyone()
    Accelerator().end_training()
