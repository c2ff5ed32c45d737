"""SAttendTrainer in two CPU processes started by `accelerate launch`: masks differ by rank, weights stay in sync.

accelerate 1.16 starts a single process for `accelerate launch --cpu --num_processes 2` unless an
mpirun hostfile is given. So the test uses the torchrun launcher (`--multi_gpu`) with the GPUs hidden
and `use_cpu=True`, and the two processes train on CPU over the gloo backend.
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

TESTS_DIR = Path(__file__).resolve().parent

WORKER = """
import hashlib, json, sys
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, sys.argv[2])
from tiny_models import build_tiny_model, make_batch
from attend_robust.sattend import SAttendTrainer, SAttendTrainingArguments

output_dir = Path(sys.argv[1])
lengths = (9, 6, 4, 8, 5, 7, 3, 9)
batch = make_batch("bert", lengths=lengths)
dataset = Dataset.from_dict({"input_ids": batch["input_ids"].tolist(),
                             "attention_mask": batch["attention_mask"].tolist(),
                             "labels": [0, 1, 0, 1, 1, 0, 1, 0]})
args = SAttendTrainingArguments(output_dir=str(output_dir), sattend_alpha=0.3, per_device_train_batch_size=2,
                                max_steps=3, report_to="none", save_strategy="no", use_cpu=True,
                                disable_tqdm=True, seed=3)
trainer = SAttendTrainer(model=build_tiny_model("bert", num_labels=2), args=args, train_dataset=dataset)
digests = []
draw_masks = trainer.draw_masks
def recording_draw_masks(inputs, special_tokens_mask, global_step, micro_step):
    source = draw_masks(inputs, special_tokens_mask, global_step, micro_step)
    digests.append(hashlib.sha256(source.layer_keep(0).numpy().tobytes()).hexdigest())
    return source
trainer.draw_masks = recording_draw_masks
trainer.train()
trainer.save_model()
weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
rank = args.process_index
(output_dir / f"rank{rank}.json").write_text(json.dumps({
    "world_size": args.world_size, "digests": digests, "weights": weights.tolist()[:64],
    "weight_sum": float(weights.double().sum()),
}))
# Wait for every process, then destroy the process group, because a process that exits while
# another still works in the group can abort at interpreter exit.
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
"""


def free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_cpu_processes(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not installed")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    output_dir = tmp_path / "out"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--main_process_port", str(free_local_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
         str(script), str(output_dir), str(TESTS_DIR)],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=180,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]

    ranks = [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert len(ranks[0]["digests"]) == len(ranks[1]["digests"]) == 3
    for step, (first, second) in enumerate(zip(ranks[0]["digests"], ranks[1]["digests"])):
        assert first != second, f"both processes drew the same masks at step {step}"
    assert len(set(ranks[0]["digests"])) == 3, "masks repeat between steps"
    assert ranks[0]["weights"] == ranks[1]["weights"], "the processes' weights diverged"
    assert ranks[0]["weight_sum"] == ranks[1]["weight_sum"]
    config = json.loads((output_dir / "config.json").read_text())
    assert config["sattend"]["alpha"] == 0.3
