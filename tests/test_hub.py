"""Model cards with S-Attend settings and HackAttend results, and what a push to the Hub uploads (no network)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

import transformers.trainer
from attend_robust import hub
from attend_robust.hub import HackAttendResult, check_model_card, files_to_push, missing_push_files, update_model_card
from attend_robust.sattend import SAttendTrainer, SAttendTrainingArguments
from tiny_models import build_tiny_model, make_batch

# A report shaped as `attend-robust attack` writes it: settings under config and run_info.
REPORT = {
    "evaluated": 872,
    "clean_accuracy": 0.9,
    "robust_accuracy": 0.55,
    "attack_success_rate": 0.3888,
    "mean_queries": 41.5,
    "num_layers": 6,
    "num_heads": 12,
    "config": {"alpha": 0.01, "max_layers": None, "max_heads": 6, "unit_ranking": "gradient"},
    "run_info": {"model": "runs/minilm", "dataset": "sst2", "split": "dev", "limit": None},
}
SATTEND = {"alpha": 0.2, "granularity": "token", "layers": None, "seed": 42, "library_version": "0.1.0"}


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class FakeHubApi:
    """Stands in for `HfApi`: records create_repo and upload_folder calls and sends nothing."""

    def __init__(self) -> None:
        self.created: list[tuple[str, dict]] = []
        self.uploads: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        self.created.append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"user/{repo_id}")

    def upload_folder(self, **kwargs):
        self.uploads.append(kwargs)
        return SimpleNamespace(oid="0" * 40)

    def uploaded_files(self, upload: dict) -> list[str]:
        """Apply the upload's ignore patterns to its folder as `HfApi.upload_folder` does."""
        folder = Path(upload["folder_path"])
        files = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
        ignore = [*(upload.get("ignore_patterns") or []), *DEFAULT_IGNORE_PATTERNS]
        return list(filter_repo_objects(files, allow_patterns=upload.get("allow_patterns"), ignore_patterns=ignore))


def save_tiny_checkpoint(folder: Path, sattend: dict | None = SATTEND) -> None:
    model = build_tiny_model("bert", num_labels=2)
    if sattend is not None:
        model.config.sattend = sattend
    model.save_pretrained(folder)


# ---------------------------------------------------------------------- reports


def test_report_fields_from_attack_output(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    result = HackAttendResult.from_report(path)
    assert result.clean_accuracy == 0.9
    assert result.robust_accuracy == 0.55
    assert result.attack_success_rate == 0.3888
    assert (result.alpha, result.max_layers, result.max_heads) == (0.01, 6, 6)
    assert (result.dataset, result.split) == ("sst2", "dev")
    assert result.mean_queries == 41.5
    assert result.evaluated == 872


def test_report_flat_fields():
    flat = {"clean_accuracy": 0.6, "robust_accuracy": 0.01, "attack_success_rate": 0.98, "alpha": 0.01,
            "max_layers": 12, "max_heads": 12, "dataset": "dream", "split": "validation"}
    result = HackAttendResult.from_report(flat)
    assert result.mean_queries is None
    (clean, *_), = [result.eval_results("multiple-choice")]
    assert clean.dataset_type == "dataset-org/dream"
    assert clean.task_type == "multiple-choice"


def test_report_errors(tmp_path):
    with pytest.raises(ValueError, match="lacks alpha, dataset"):
        HackAttendResult.from_report({k: v for k, v in REPORT.items() if k not in ("config", "run_info")})
    with pytest.raises(ValueError, match="fraction in"):
        HackAttendResult.from_report({**REPORT, "clean_accuracy": 90.0})
    with pytest.raises(FileNotFoundError, match="not found"):
        HackAttendResult.from_report(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        HackAttendResult.from_report(tmp_path / "bad.json")


# ---------------------------------------------------------------------- cards


def test_card_parses_with_results(tmp_path):
    save_tiny_checkpoint(tmp_path)
    update_model_card(tmp_path, hackattend_report=REPORT)

    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert {"attend-robust", "s-attend", "hackattend"} <= set(data.tags)
    results = {result.metric_type: result for result in data.eval_results}
    assert set(results) == {"accuracy", "robust_accuracy", "attack_success_rate", "mean_queries"}
    assert results["accuracy"].metric_value == 0.9
    assert results["robust_accuracy"].metric_value == 0.55
    assert results["attack_success_rate"].metric_value == 0.3888
    assert results["robust_accuracy"].metric_args == {"attack": "HackAttend", "alpha": 0.01, "max_layers": 6,
                                                     "max_heads": 6}
    for result in results.values():
        assert isinstance(result, EvalResult)
        assert (result.dataset_type, result.dataset_config, result.dataset_split) == ("nyu-mll/glue", "sst2",
                                                                                     "validation")
    assert data.model_name == tmp_path.name
    assert "| 0.2 |" in card.text
    assert "| token |" in card.text
    assert "90.0% | 55.0% | 38.9% | 41.5" in card.text


def test_card_marks_sample_of_split(tmp_path):
    save_tiny_checkpoint(tmp_path)
    sample = {**REPORT, "examples": 200, "evaluated": 200}
    card = update_model_card(tmp_path, hackattend_report=sample)
    for result in card.data.eval_results:
        assert result.dataset_split == "validation (sample of 200)"
        assert result.dataset_args == {"num_examples": 200, "split_size": 872}
    assert "Measured on a sample of 200 of the 872 examples of sst2 (dev)." in card.text

    # A result on the whole split is another entry of the model-index, not a new value of the sample's.
    whole = update_model_card(tmp_path, hackattend_report={**REPORT, "examples": 872})
    splits = [result.dataset_split for result in whole.data.eval_results if result.metric_type == "accuracy"]
    assert splits == ["validation (sample of 200)", "validation"]
    assert "Measured on 872 examples of sst2 (dev)." in whole.text


def test_card_corrects_trainer_opening(tmp_path):
    save_tiny_checkpoint(tmp_path)
    (tmp_path / "README.md").write_text(
        "---\ntags:\n- generated_from_trainer\n---\n\n# out\n\n"
        "This model was trained from scratch on the None dataset.\n"
    )
    card = update_model_card(tmp_path, base_model="sentence-transformers/all-MiniLM-L6-v2")
    assert "This model is a fine-tuned version of [sentence-transformers/all-MiniLM-L6-v2]" in card.text
    assert "on an unknown dataset." in card.text
    assert "from scratch" not in card.text


def test_card_update_is_idempotent(tmp_path):
    save_tiny_checkpoint(tmp_path)
    update_model_card(tmp_path, hackattend_report=REPORT)
    first = (tmp_path / "README.md").read_text()
    update_model_card(tmp_path, hackattend_report=REPORT)
    assert (tmp_path / "README.md").read_text() == first

    newer = {**REPORT, "robust_accuracy": 0.5}
    card = update_model_card(tmp_path, hackattend_report=newer)
    robust = [r for r in card.data.eval_results if r.metric_type == "robust_accuracy"]
    assert [r.metric_value for r in robust] == [0.5]
    assert card.text.count("## S-Attend training") == 1
    assert card.text.count("## Robustness under HackAttend") == 1

    other_scale = {**REPORT, "config": {**REPORT["config"], "max_heads": 12}}
    card = update_model_card(tmp_path, hackattend_report=other_scale)
    assert len([r for r in card.data.eval_results if r.metric_type == "robust_accuracy"]) == 2


def test_card_keeps_existing_text(tmp_path):
    save_tiny_checkpoint(tmp_path, sattend=None)
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My model\n\nNotes.\n")
    card = update_model_card(tmp_path, sattend=SATTEND)
    assert card.data.license == "mit"
    assert card.data.tags == ["mine", "attend-robust", "s-attend"]
    assert card.text.lstrip().startswith("# My model\n\nNotes.")
    assert "## Robustness under HackAttend" not in card.text


def test_hub_model_id_of_local_copies(tmp_path):
    assert hub.hub_model_id("bert-base-uncased") == "bert-base-uncased"
    assert hub.hub_model_id("user/model") == "user/model"
    assert hub.hub_model_id(str(tmp_path)) is None
    assert hub.hub_model_id("") is None
    packaged = hub.packaged_minilm_path()
    if packaged is not None:
        assert hub.hub_model_id(str(packaged)) == "sentence-transformers/all-MiniLM-L6-v2"


def test_invalid_card_rejected(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("---\nmodel-index:\n- name: x\n  results:\n  - task: {}\n---\n")
    with pytest.raises(ValueError):
        check_model_card(path)


# ---------------------------------------------------------------------- pushes


def test_push_helper_uploads_complete_folder(tmp_path):
    save_tiny_checkpoint(tmp_path / "model")
    (tmp_path / "model" / "checkpoint-2").mkdir()
    (tmp_path / "model" / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
    api = FakeHubApi()
    hub.push_to_hub(tmp_path / "model", "user/tiny", hackattend_report=REPORT, api=api, private=True)

    assert api.created == [("user/tiny", {"token": None, "private": True, "exist_ok": True})]
    (upload,) = api.uploads
    assert upload["repo_id"] == "user/tiny"
    uploaded = api.uploaded_files(upload)
    assert uploaded == files_to_push(tmp_path / "model")
    assert {"config.json", "model.safetensors", "README.md"} <= set(uploaded)
    assert not [name for name in uploaded if name.startswith("checkpoint-")]
    check_model_card(tmp_path / "model" / "README.md")


def test_push_helper_rejects_incomplete_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "sattend": SATTEND}))
    with pytest.raises(ValueError, match="missing weights"):
        hub.push_to_hub(tmp_path, "user/tiny", api=FakeHubApi())
    assert missing_push_files(tmp_path) == [m for m in missing_push_files(tmp_path) if m.startswith("weights")]


def test_trainer_push_to_hub_folder(tmp_path, monkeypatch):
    api = FakeHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    batch = make_batch("bert", lengths=(9, 6, 4, 8), seq_len=9)
    dataset = Dataset.from_dict({"input_ids": batch["input_ids"].tolist(),
                                 "attention_mask": batch["attention_mask"].tolist(), "labels": [0, 1, 0, 1]})
    args = SAttendTrainingArguments(output_dir=str(tmp_path / "out"), sattend_alpha=0.2, max_steps=2,
                                    per_device_train_batch_size=2, save_strategy="steps", save_steps=1,
                                    report_to="none", use_cpu=True, disable_tqdm=True, hub_model_id="user/robust")
    trainer = SAttendTrainer(model=build_tiny_model("bert", num_labels=2), args=args, train_dataset=dataset)
    trainer.train()
    trainer.push_to_hub(hackattend_report=REPORT)

    assert [repo for repo, _ in api.created] == ["user/robust"]
    (upload,) = api.uploads
    assert Path(upload["folder_path"]) == tmp_path / "out"
    uploaded = api.uploaded_files(upload)
    assert uploaded == files_to_push(tmp_path / "out")
    assert {"config.json", "model.safetensors", "README.md", "training_args.bin"} <= set(uploaded)
    assert not [name for name in uploaded if name.startswith("checkpoint-")]
    assert missing_push_files(tmp_path / "out") == []

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["sattend"]["alpha"] == 0.2
    card = check_model_card(tmp_path / "out" / "README.md")
    assert "generated_from_trainer" in card.data.tags
    assert "s-attend" in card.data.tags
    assert card.data.model_name == "robust"
    assert {r.metric_type for r in card.data.eval_results} >= {"accuracy", "robust_accuracy", "attack_success_rate"}
