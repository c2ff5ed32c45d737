"""Tests of `finetune` and the `finetune` command on tiny models and slices of SST-2 and DREAM."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import AutoModelForMultipleChoice, AutoModelForSequenceClassification

from attend_robust import training
from attend_robust.training import TASK_DEFAULTS, add_finetune_command, finetune, finetune_defaults
from test_data import build_tiny_tokenizer
from tiny_models import build_tiny_model

# The tiny model has 64 positions, so every run here uses a maximum length below the usual 128.
MAX_LENGTH = 48


@pytest.fixture(autouse=True)
def _one_thread():
    # One thread keeps these tests fast on a 2-core machine that runs other work.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A folder with a tiny BERT encoder (no task head) and a matching tiny WordPiece tokenizer."""
    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    build_tiny_tokenizer().save_pretrained(folder)
    build_tiny_model("bert", "base").save_pretrained(folder)
    return folder


def _read_json(path):
    return json.loads(path.read_text())


def test_finetune_defaults_table9():
    assert finetune_defaults("sst2") == TASK_DEFAULTS["sst2"]
    assert finetune_defaults("SST-2").learning_rate == 2e-5
    assert finetune_defaults("dream").batch_size == 16
    assert finetune_defaults("dream").epochs == 8
    assert finetune_defaults("dream").warmup_ratio == 0.1
    assert finetune_defaults("some/hub-dataset") == TASK_DEFAULTS["sst2"]


def test_finetune_dream_multiple_choice(tiny_model_dir, shared_data, tmp_path):
    output_dir = tmp_path / "dream-run"
    summary = finetune(str(tiny_model_dir), "dream", output_dir, data_dir=shared_data, train_limit=16,
                       eval_limit=8, epochs=1, batch_size=4, max_length=MAX_LENGTH)

    assert summary["train_examples"] == 16
    assert summary["eval_examples"] == 8
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    assert summary["train_truncated"] > 0

    recorded = _read_json(output_dir / "finetune_args.json")
    assert recorded["task_kind"] == "multiple-choice"
    assert recorded["learning_rate"] == 3e-5
    assert recorded["warmup_ratio"] == 0.1
    assert recorded["batch_size"] == 4
    assert _read_json(output_dir / "eval_results.json")["eval_accuracy"] == summary["eval_accuracy"]

    model = AutoModelForMultipleChoice.from_pretrained(output_dir)
    assert model.classifier.out_features == 1
    assert (output_dir / "tokenizer_config.json").is_file()


def test_finetune_uses_sattend_trainer(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    from attend_robust import sattend

    created = []

    class RecordingTrainer(sattend.SAttendTrainer):
        def __init__(self, *args, **kwargs):
            created.append(kwargs["args"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sattend, "SAttendTrainer", RecordingTrainer)
    output_dir = tmp_path / "sattend-run"
    summary = finetune(str(tiny_model_dir), "sst2", output_dir, data_dir=shared_data, train_limit=32,
                       eval_limit=16, epochs=1, batch_size=8, max_length=MAX_LENGTH, sattend_alpha=0.2,
                       sattend_granularity="token")

    assert len(created) == 1
    assert created[0].sattend_alpha == 0.2
    assert created[0].sattend_granularity == "token"
    assert summary["eval_examples"] == 16
    assert _read_json(output_dir / "finetune_args.json")["sattend_alpha"] == 0.2


def test_finetune_plain_trainer_at_alpha_zero(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    from attend_robust import sattend

    def fail(*args, **kwargs):
        raise AssertionError("SAttendTrainer must not be used when sattend_alpha is 0")

    monkeypatch.setattr(sattend, "SAttendTrainer", fail)
    summary = finetune(str(tiny_model_dir), "sst2", tmp_path / "plain", data_dir=shared_data, train_limit=16,
                       eval_limit=8, epochs=1, batch_size=8, max_length=MAX_LENGTH)
    assert summary["train_examples"] == 16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sattend_alpha": 1.0}, "sattend_alpha is the probability"),
        ({"sattend_granularity": "head"}, "sattend_granularity must be one of"),
        ({"warmup_ratio": 1.5}, "warmup_ratio is a fraction"),
        ({"epochs": 0}, "epochs must be positive"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"train_limit": 0}, "train_limit must be a positive"),
        ({"num_train_epochs": 2}, r"\['num_train_epochs'\] are set by finetune"),
    ],
)
def test_finetune_rejects_invalid_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        finetune("unused-model", "sst2", tmp_path / "out", **overrides)


def test_finetune_rejects_single_file(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\ngood,1\n")
    with pytest.raises(ValueError, match="needs a train split and a dev split"):
        finetune("unused-model", str(path), tmp_path / "out")


def _finetune_parser():
    parser = argparse.ArgumentParser(prog="attend-robust")
    add_finetune_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_options_have_help():
    subparser = _finetune_parser()._subparsers._group_actions[0].choices["finetune"]
    for action in subparser._actions:
        if action.dest != "help":
            assert action.help, f"option {action.option_strings} has no help text"


def test_cli_rejects_invalid_granularity(tmp_path):
    with pytest.raises(SystemExit):
        _finetune_parser().parse_args(["finetune", "--model", "m", "--dataset", "sst2", "--output-dir",
                                       str(tmp_path), "--sattend-granularity", "head"])


def test_cli_finetune_sst2(tiny_model_dir, shared_data, tmp_path, capsys):
    output_dir = tmp_path / "cli-run"
    args = _finetune_parser().parse_args([
        "finetune", "--model", str(tiny_model_dir), "--dataset", "sst2", "--data-dir", str(shared_data),
        "--output-dir", str(output_dir), "--train-limit", "32", "--eval-limit", "16", "--epochs", "1",
        "--batch-size", "8", "--max-length", str(MAX_LENGTH), "--learning-rate", "1e-4", "--seed", "7",
    ])
    assert args.func is training._run_finetune_command
    assert args.func(args) == 0

    # The Trainer prints its own one-line logs first; the summary is the last, indented, JSON object.
    output = capsys.readouterr().out
    printed = json.loads(output[output.rindex("{\n"):])
    assert printed["train_examples"] == 32
    assert printed["eval_examples"] == 16
    recorded = _read_json(output_dir / "finetune_args.json")
    assert recorded["learning_rate"] == 1e-4
    assert recorded["batch_size"] == 8
    assert recorded["warmup_ratio"] == 0.06
    assert recorded["seed"] == 7
    assert recorded["train_limit"] == 32

    model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    assert model.config.id2label == {0: "negative", 1: "positive"}
