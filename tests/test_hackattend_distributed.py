"""Two CPU processes under `accelerate launch --multi_gpu` give the records and report of one process.

This test starts three Python processes that each import torch and transformers, so it takes
about 30 to 60 s on a 2-core machine. Skip it with `-k "not distributed"`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hackattend_support import flippy_bert, minilm_tokenizer, write_tsv

from attend_robust.cli import main as cli_main

HERE = Path(__file__).resolve().parent
ROWS = [
    ("a gorgeous , witty , seductive movie .", 1),
    ("the story is too predictable .", 0),
    ("an utterly charming and hilarious film", 1),
    ("it 's a bad sign when you 're rooting for the villain .", 0),
    ("the performances are uniformly excellent .", 1),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CONFIDENCE_FIELDS = ("clean_confidence", "adversarial_confidence")


def _records(path: Path) -> list[dict]:
    """Read records without wall times and confidences, which `_confidences` compares with a tolerance."""
    records = []
    for line in path.read_text().splitlines():
        record = {**json.loads(line), "seconds": None}
        for name in CONFIDENCE_FIELDS:
            record[name] = None
        records.append(record)
    return records


def _confidences(path: Path) -> list[float]:
    """Return every record's probabilities; BLAS results may differ in the last float digits between processes."""
    values = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        values.extend(record[name] or 0.0 for name in CONFIDENCE_FIELDS)
    return values


def _report(path: Path) -> dict:
    report = json.loads(path.read_text())
    report.pop("timing")
    return report


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="the accelerate launcher is not installed")
def test_two_processes_match_one_process(tmp_path, shared_data):
    tokenizer = minilm_tokenizer()
    model_dir = tmp_path / "victim"
    flippy_bert(tokenizer.vocab_size).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # Five examples do not divide evenly over two processes; one example leaves a process idle.
    uneven = write_tsv(tmp_path / "uneven.tsv", ROWS)
    single = write_tsv(tmp_path / "single.tsv", ROWS[:1])

    launcher = Path(sys.executable).parent / "accelerate"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        # `--cpu` would start a single process with Accelerate 1.16; `--multi_gpu` starts two through
        # torchrun, and the package's default Accelerator joins them in a gloo group on a machine without GPU.
        [str(launcher) if launcher.exists() else "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()),
         str(HERE / "hackattend_distributed_run.py"), str(model_dir), str(tmp_path / "two"), str(uneven), str(single)],
        capture_output=True, text=True, timeout=180, env=environment, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]

    for data_file in (uneven, single):
        one = tmp_path / "one" / data_file.stem
        assert cli_main(["attack", "--model", str(model_dir), "--dataset", str(data_file), "--output-dir", str(one),
                         "--alpha", "0.2", "--query-batch-size", "3", "--no-progress"]) == 0
        two = tmp_path / "two" / data_file.stem
        assert _records(two / "records.jsonl") == _records(one / "records.jsonl"), data_file.stem
        assert _confidences(two / "records.jsonl") == pytest.approx(_confidences(one / "records.jsonl"), rel=1e-5)
        assert _report(two / "report.json") == _report(one / "report.json"), data_file.stem
        gathered = tmp_path / "two" / f"{data_file.stem}.gathered.jsonl"
        assert _records(gathered) == _records(one / "records.jsonl"), data_file.stem
        assert not list(two.glob("records.part-*")), "part files are merged and removed"
        assert json.loads((two / "wall_time.json").read_text())[-1]["processes"] == 2

    assert len(_records(tmp_path / "one" / "uneven" / "records.jsonl")) == 5
