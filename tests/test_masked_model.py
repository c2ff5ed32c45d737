"""AttentionMaskedModel against unwrapped models, autograd references and finite differences."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from tiny_models import ARCHITECTURES, ENCODERS, SDPA_ARCHITECTURES, build_tiny_model, make_batch
from torch import nn

from attend_robust import AttentionMaskedModel
from attend_robust._prefix import PrefixReuse, select_rows
from attend_robust._state import apply_keep_and_gates
from attend_robust.masked_model import checkpointing_disable_method

MULTIPLE_CHOICE_ARCHITECTURES = ("bert", "roberta", "xlm-roberta", "electra", "albert", "distilbert", "deberta-v2")
# DeBERTa takes boolean masks only. Llama's RMSNorm computes in float32 even in a float64 model,
# which drowns a finite difference; its mask-gradient is checked against autograd instead.
FINITE_DIFFERENCE_ARCHITECTURES = tuple(a for a in ARCHITECTURES if not a.startswith("deberta") and a != "llama")


def all_keep(wrapped: AttentionMaskedModel, seq_len: int) -> torch.Tensor:
    return torch.ones(wrapped.num_layers, wrapped.num_heads, seq_len, seq_len, dtype=torch.bool)


def classifier_position(architecture: str, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position whose hidden state the classification head reads, per sequence."""
    if architecture in ("gpt2", "llama"):
        return attention_mask.sum(dim=-1) - 1
    return torch.zeros(attention_mask.shape[0], dtype=torch.long)


def output_projections(architecture: str, model: nn.Module) -> list[nn.Module]:
    """Each layer's attention output projection, whose input is the heads' concatenated context."""
    names = {
        "bert": "attention.output.dense",
        "roberta": "attention.output.dense",
        "xlm-roberta": "attention.output.dense",
        "electra": "attention.output.dense",
        "deberta": "attention.output.dense",
        "deberta-v2": "attention.output.dense",
        "distilbert": "attention.out_lin",
        "albert": "attention.dense",
        "gpt2": "attn.c_proj",
        "llama": "self_attn.o_proj",
    }
    suffix = names[architecture]
    return [module for name, module in model.named_modules() if name.endswith(suffix)]


# ---------------------------------------------------------------- 1. all-keep equals unwrapped


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_all_keep_matches_unwrapped_eager(architecture):
    model = build_tiny_model(architecture)
    batch = make_batch(architecture)
    with torch.no_grad():
        reference = model(**batch).logits
        wrapped = AttentionMaskedModel(model)
        masked = wrapped(**batch, unit_mask=all_keep(wrapped, batch["input_ids"].shape[1])).logits
        unmasked = wrapped(**batch).logits
    torch.testing.assert_close(masked, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(unmasked, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("architecture", SDPA_ARCHITECTURES)
def test_all_keep_matches_unwrapped_sdpa(architecture):
    model = build_tiny_model(architecture, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    batch = make_batch(architecture)
    with torch.no_grad():
        reference = model(**batch).logits
        wrapped = AttentionMaskedModel(model)
        masked = wrapped(**batch, unit_mask=all_keep(wrapped, batch["input_ids"].shape[1])).logits
    torch.testing.assert_close(masked, reference, atol=1e-5, rtol=0)
    wrapped.unwrap()
    assert model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- 2. masked units


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_masked_unit_gets_zero_and_row_renormalises(architecture):
    model = build_tiny_model(architecture)
    batch = make_batch(architecture)
    wrapped = AttentionMaskedModel(model)
    seq_len = batch["input_ids"].shape[1]
    query, key, head = 3, 1, 2
    keep = all_keep(wrapped, seq_len)
    keep[0, head, query, key] = False

    clean = wrapped.attention_saliency(batch, method="score")
    masked = wrapped.attention_saliency(batch, method="score", unit_mask=keep)

    assert torch.all(masked[:, 0, head, query, key] == 0)
    # Layer 0 receives the same inputs, so the row is the clean row without the key, renormalised.
    expected_row = clean[:, 0, head, query].clone()
    expected_row[:, key] = 0
    expected_row = expected_row / expected_row.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(masked[:, 0, head, query], expected_row, atol=1e-6, rtol=1e-5)
    # Every other row of layer 0 is untouched.
    other_rows = torch.ones(seq_len, dtype=torch.bool)
    other_rows[query] = False
    torch.testing.assert_close(masked[:, 0, head, other_rows], clean[:, 0, head, other_rows], atol=1e-6, rtol=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_masked_key_token_cannot_reach_output(architecture):
    model = build_tiny_model(architecture)
    batch = make_batch(architecture, lengths=(9, 9, 9))
    wrapped = AttentionMaskedModel(model)
    seq_len = batch["input_ids"].shape[1]
    hidden_key = 4
    keep = all_keep(wrapped, seq_len)
    keep[..., hidden_key] = False  # no query in any layer or head may attend to key 4
    keep[..., hidden_key, hidden_key] = True  # it may still attend to itself
    changed = {name: value.clone() for name, value in batch.items()}
    changed["input_ids"][:, hidden_key] = (changed["input_ids"][:, hidden_key] + 7) % 90 + 3

    with torch.no_grad():
        before = wrapped(**batch, unit_mask=keep, output_hidden_states=True)
        after = wrapped(**changed, unit_mask=keep, output_hidden_states=True)
        unmasked_before = wrapped(**batch, output_hidden_states=True).hidden_states[-1]
        unmasked_after = wrapped(**changed, output_hidden_states=True).hidden_states[-1]

    rows = torch.arange(seq_len) != hidden_key
    torch.testing.assert_close(after.hidden_states[-1][:, rows], before.hidden_states[-1][:, rows], atol=1e-5, rtol=0)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=0)
    # Without the mask the same change reaches the other positions, so the check above can fail.
    assert not torch.allclose(unmasked_after[:, rows], unmasked_before[:, rows], atol=1e-4)


# ---------------------------------------------------------------- 3. fully masked rows and heads


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fully_masked_rows_and_heads_stay_finite(architecture):
    model = build_tiny_model(architecture)
    batch = make_batch(architecture)
    wrapped = AttentionMaskedModel(model)
    seq_len = batch["input_ids"].shape[1]
    keep = all_keep(wrapped, seq_len)
    keep[0, 1, 2, :] = False  # one row with every key masked
    keep[1, 0] = False  # one whole head
    labels = torch.tensor([0, 1, 2])

    outputs = wrapped(**batch, unit_mask=keep, labels=labels)
    outputs.loss.backward()
    assert torch.isfinite(outputs.logits).all()
    assert torch.isfinite(outputs.loss)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name
    model.zero_grad(set_to_none=True)

    probabilities = wrapped.attention_saliency(batch, method="score", unit_mask=keep)
    assert torch.all(probabilities[:, 0, 1, 2] == 0), "an emptied row yields all-zero probabilities"
    # DeBERTa masks padded queries as well; those rows keep the model's own values.
    real_queries = batch["attention_mask"].bool()
    assert torch.all(probabilities[:, 1, 0][real_queries] == 0), "an emptied head yields all-zero probabilities"
    for method in ("gradient", "mask-gradient"):
        assert torch.isfinite(wrapped.attention_saliency(batch, method=method, unit_mask=keep)).all()

    everything_masked = torch.zeros_like(keep)
    assert torch.isfinite(wrapped(**batch, unit_mask=everything_masked).logits).all()


# ---------------------------------------------------------------- 4. head gates


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_head_gate_equals_zeroed_context(architecture):
    model = build_tiny_model(architecture)
    batch = make_batch(architecture)
    wrapped = AttentionMaskedModel(model)
    gated_layer, gated_head = 1, 2
    gates = torch.ones(wrapped.num_layers, wrapped.num_heads)
    gates[gated_layer, gated_head] = 0
    seq_len = batch["input_ids"].shape[1]
    keep = all_keep(wrapped, seq_len)
    keep[0, 3, :, 2] = False

    with torch.no_grad():
        gated = wrapped(**batch, head_gates=gates).logits
        gated_and_masked = wrapped(**batch, head_gates=gates, unit_mask=keep).logits
        masked_only = wrapped(**batch, unit_mask=keep).logits
    wrapped.unwrap()

    # Reference: zero the head's slice of the context vector entering the output projection.
    head_size = model.config.hidden_size // wrapped.num_heads
    calls = {"count": 0}
    handles = []

    def zero_head_slice(module, args):
        layer = calls["count"]
        calls["count"] += 1
        if layer != gated_layer:
            return None
        context = args[0].clone()
        context[..., gated_head * head_size : (gated_head + 1) * head_size] = 0
        return (context, *args[1:])

    projections = output_projections(architecture, model)
    assert projections, f"no output projection found for {architecture}"
    for projection in dict.fromkeys(projections):  # ALBERT shares one module between layers
        handles.append(projection.register_forward_pre_hook(zero_head_slice))
    try:
        with torch.no_grad():
            calls["count"] = 0
            reference = model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()

    torch.testing.assert_close(gated, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(gated, masked_only, atol=1e-5)
    # Gates and the unit mask compose: both applied differ from each alone.
    assert not torch.allclose(gated_and_masked, gated, atol=1e-6)
    assert not torch.allclose(gated_and_masked, masked_only, atol=1e-6)


def test_head_gates_compose_with_unit_mask_in_probabilities():
    model = build_tiny_model("bert")
    batch = make_batch("bert")
    wrapped = AttentionMaskedModel(model)
    seq_len = batch["input_ids"].shape[1]
    gates = torch.ones(wrapped.num_layers, wrapped.num_heads)
    gates[0, 1] = 0.5
    keep = all_keep(wrapped, seq_len)
    keep[0, 1, :, 3] = False

    masked = wrapped.attention_saliency(batch, method="score", unit_mask=keep)
    both = wrapped.attention_saliency(batch, method="score", unit_mask=keep, head_gates=gates)
    torch.testing.assert_close(both[:, 0, 1], 0.5 * masked[:, 0, 1])
    assert torch.all(both[:, 0, 1, :, 3] == 0)


# ---------------------------------------------------------------- 5. saliency


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saliency_matches_autograd_reference(architecture):
    model = build_tiny_model(architecture)
    batch = make_batch(architecture)
    labels = torch.tensor([2, 0, 1])

    # Reference: the unwrapped eager model's attentions, and dL/dp by plain autograd.
    outputs = model(**batch, output_attentions=True)
    loss = nn.functional.cross_entropy(outputs.logits, labels, reduction="sum")
    reference_gradient = torch.stack(torch.autograd.grad(loss, outputs.attentions), dim=1)
    reference_score = torch.stack(outputs.attentions, dim=1).detach()
    reference_mask_gradient = reference_score * (
        reference_gradient - (reference_score * reference_gradient).sum(dim=-1, keepdim=True)
    )

    wrapped = AttentionMaskedModel(model)
    score = wrapped.attention_saliency(batch, labels, method="score")
    gradient = wrapped.attention_saliency(batch, labels, method="gradient")
    mask_gradient = wrapped.attention_saliency(batch, labels, method="mask-gradient")

    assert gradient.shape == (3, wrapped.num_layers, wrapped.num_heads, 9, 9)
    torch.testing.assert_close(score, reference_score, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gradient, reference_gradient, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(mask_gradient, reference_mask_gradient, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("architecture", FINITE_DIFFERENCE_ARCHITECTURES)
def test_mask_gradient_matches_finite_difference(architecture):
    model = build_tiny_model(architecture, dtype=torch.float64)
    batch = make_batch(architecture)
    labels = torch.tensor([1, 2, 0])
    wrapped = AttentionMaskedModel(model)
    seq_len = batch["input_ids"].shape[1]
    saliency = wrapped.attention_saliency(batch, labels, method="mask-gradient").double()

    def loss_with(keep: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = wrapped(**batch, unit_mask=keep).logits
        return nn.functional.cross_entropy(logits, labels, reduction="sum")

    step = 1e-6
    for layer, head, query, key in [(0, 0, 0, 1), (1, 3, 2, 0), (1, 1, 5, 5), (0, 2, 3, 3)]:
        keep = torch.ones(wrapped.num_layers, wrapped.num_heads, seq_len, seq_len, dtype=torch.float64)
        keep[layer, head, query, key] = 1 - step
        lowered = loss_with(keep)
        keep[layer, head, query, key] = 1.0
        finite_difference = (loss_with(keep) - lowered) / step
        expected = saliency[:, layer, head, query, key].sum()
        torch.testing.assert_close(finite_difference, expected, atol=1e-6, rtol=1e-3)


def test_saliency_leaves_parameters_and_mode_alone():
    model = build_tiny_model("bert").train()
    batch = make_batch("bert")
    wrapped = AttentionMaskedModel(model)
    for method in ("gradient", "mask-gradient", "score"):
        wrapped.attention_saliency(batch, torch.tensor([0, 1, 2]), method=method)
    assert model.training
    assert all(parameter.grad is None for parameter in model.parameters())


def test_saliency_rejects_unknown_method():
    wrapped = AttentionMaskedModel(build_tiny_model("bert"))
    with pytest.raises(ValueError, match="'integrated'"):
        wrapped.attention_saliency(make_batch("bert"), method="integrated")


def test_saliency_is_independent_of_batch():
    wrapped = AttentionMaskedModel(build_tiny_model("bert"))
    batch = make_batch("bert")
    labels = torch.tensor([0, 1, 2])
    together = wrapped.attention_saliency(batch, labels, method="gradient")
    alone = wrapped.attention_saliency({k: v[1:2] for k, v in batch.items()}, labels[1:2], method="gradient")
    torch.testing.assert_close(together[1:2], alone, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- 6. bf16


@pytest.mark.parametrize("architecture", ["bert", "distilbert", "deberta-v2", "llama"])
def test_bf16_forward_and_backward_with_masks(architecture):
    model = build_tiny_model(architecture, dtype=torch.bfloat16)
    batch = make_batch(architecture)
    wrapped = AttentionMaskedModel(model)
    seq_len = batch["input_ids"].shape[1]
    keep = all_keep(wrapped, seq_len)
    keep[0, 0, :, 1] = False
    keep[1, 2, 3, :] = False
    outputs = wrapped(**batch, unit_mask=keep, labels=torch.tensor([0, 1, 2]))
    assert outputs.logits.dtype == torch.bfloat16
    outputs.loss.backward()
    assert torch.isfinite(outputs.loss.float())
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(wrapped.attention_saliency(batch, method="mask-gradient", unit_mask=keep)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fill_value_follows_score_dtype(dtype):
    scores = torch.zeros(1, 1, 2, 3, dtype=dtype)
    keep = torch.tensor([[True, False, True], [True, True, True]])
    filled, emptied = apply_keep_and_gates(scores, None, keep)
    assert filled.dtype == dtype
    assert filled[0, 0, 0, 1] == torch.finfo(dtype).min
    assert not emptied.any()


# ---------------------------------------------------------------- 7. multiple choice


@pytest.mark.parametrize("architecture", MULTIPLE_CHOICE_ARCHITECTURES)
def test_multiple_choice_masks(architecture):
    model = build_tiny_model(architecture, task="multiple-choice")
    flat = make_batch(architecture, lengths=(8, 5, 6, 3, 8, 7))
    batch = {name: value.view(2, 3, -1) for name, value in flat.items()}  # [B=2, C=3, S=8]
    wrapped = AttentionMaskedModel(model)
    seq_len = 8

    with torch.no_grad():
        reference = model(**batch).logits
        shared = wrapped(**batch, unit_mask=all_keep(wrapped, seq_len)).logits
        per_sequence = torch.ones(2, 3, wrapped.num_layers, wrapped.num_heads, seq_len, seq_len, dtype=torch.bool)
        per_sequence[0, 1, :, :, :, 0] = False  # only example 0, choice 1
        perturbed = wrapped(**batch, unit_mask=per_sequence).logits
        flattened = wrapped(**batch, unit_mask=per_sequence.view(6, *per_sequence.shape[2:])).logits

    assert shared.shape == (2, 3)
    torch.testing.assert_close(shared, reference, atol=1e-5, rtol=0)
    changed = ~torch.isclose(perturbed, reference, atol=1e-6)
    assert changed[0, 1]
    assert changed.sum() == 1
    torch.testing.assert_close(flattened, perturbed)


# ---------------------------------------------------------------- shapes, errors, lifecycle


def test_wrong_mask_shape_names_expected_shape():
    wrapped = AttentionMaskedModel(build_tiny_model("bert"))
    batch = make_batch("bert")
    with pytest.raises(ValueError, match=r"\[N, L, H, S, S\] = \[3, 2, 4, 9, 9\]"):
        wrapped(**batch, unit_mask=torch.ones(2, 4, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[N, L, H\] = \[3, 2, 4\]"):
        wrapped(**batch, head_gates=torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        wrapped(**batch, unit_mask=torch.full((2, 4, 9, 9), 2.0))


def test_integer_and_float_masks_equal_boolean():
    wrapped = AttentionMaskedModel(build_tiny_model("bert"))
    batch = make_batch("bert")
    keep = all_keep(wrapped, 9)
    keep[1, 0, :, 2] = False
    with torch.no_grad():
        as_bool = wrapped(**batch, unit_mask=keep).logits
        as_int = wrapped(**batch, unit_mask=keep.long()).logits
        as_float = wrapped(**batch, unit_mask=keep.float()).logits
    torch.testing.assert_close(as_int, as_bool)
    torch.testing.assert_close(as_float, as_bool)


def test_unsupported_model_names_type_and_supported_ones():
    from transformers import XLNetConfig, XLNetForSequenceClassification

    model = XLNetForSequenceClassification(XLNetConfig(vocab_size=99, d_model=32, n_layer=1, n_head=4, d_inner=37))
    with pytest.raises(ValueError, match=r"'xlnet'.*bert, roberta"):
        AttentionMaskedModel(model)


def test_rejects_non_transformers_module():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        AttentionMaskedModel(nn.Linear(2, 2))


@pytest.mark.parametrize("architecture", ["bert", "albert", "deberta-v2", "gpt2"])
def test_unwrap_restores_outputs_and_state_dict(architecture):
    model = build_tiny_model(architecture)
    batch = make_batch(architecture)
    implementation = model.config._attn_implementation
    state_before = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        before = model(**batch).logits

    with AttentionMaskedModel(model) as wrapped:
        keep = all_keep(wrapped, 9)
        keep[:, :, :, 1] = False
        with torch.no_grad():
            wrapped(**batch, unit_mask=keep)
        assert wrapped.model is model, "the wrapper must not copy the model"

    with torch.no_grad():
        after = model(**batch).logits
    assert model.config._attn_implementation == implementation
    assert torch.equal(before, after)
    state_after = model.state_dict()
    assert state_before.keys() == state_after.keys()
    assert all(torch.equal(state_before[name], state_after[name]) for name in state_before)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all("forward" not in vars(m) for m in model.modules()), "a block wrapper was left behind"


def test_save_pretrained_writes_plain_checkpoint(tmp_path):
    model = build_tiny_model("bert")
    wrapped = AttentionMaskedModel(model)
    wrapped.save_pretrained(tmp_path)
    config_text = (tmp_path / "config.json").read_text()
    assert "attend_robust" not in config_text
    assert json.loads(config_text)["model_type"] == "bert"
    assert wrapped._installed, "saving must leave the wrapper active"

    batch = make_batch("bert")
    with torch.no_grad():
        expected = model(**batch).logits.tolist()
    script = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r}).eval()\n"
        f"ids = torch.tensor({batch['input_ids'].tolist()}); mask = torch.tensor({batch['attention_mask'].tolist()})\n"
        "with torch.no_grad(): logits = model(input_ids=ids, attention_mask=mask).logits\n"
        "assert 'attend_robust' not in sys.modules\n"
        "print(json.dumps(logits.tolist()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(loaded, torch.tensor(expected), atol=1e-6, rtol=0)


def test_token_classification_and_bare_encoder():
    for task in ("token-classification", "base"):
        model = build_tiny_model("bert", task=task)
        batch = make_batch("bert")
        wrapped = AttentionMaskedModel(model)
        keep = all_keep(wrapped, 9)
        with torch.no_grad():
            reference = model(**batch)
            masked = wrapped(**batch, unit_mask=keep)
        name = "logits" if task == "token-classification" else "last_hidden_state"
        torch.testing.assert_close(getattr(masked, name), getattr(reference, name), atol=1e-5, rtol=0)

    bare = AttentionMaskedModel(build_tiny_model("bert", task="base"))
    with pytest.raises(ValueError, match="loss_fn"):
        bare.attention_saliency(make_batch("bert"), method="gradient")
    scores = bare.attention_saliency(
        make_batch("bert"), method="gradient", loss_fn=lambda outputs, labels: outputs.last_hidden_state.sum()
    )
    assert scores.shape == (3, 2, 4, 9, 9)


def test_gradient_checkpointing_in_training_is_rejected():
    model = build_tiny_model("distilbert").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped = AttentionMaskedModel(model)
    batch = make_batch("distilbert")
    keep = all_keep(wrapped, 9)
    with pytest.raises(RuntimeError, match=r"call `model\.(activation|gradient)_checkpointing_disable\(\)`"):
        wrapped(**batch, unit_mask=keep, labels=torch.tensor([0, 1, 2]))
    getattr(model, checkpointing_disable_method(model))()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the check must not use deprecated transformers names
        assert torch.isfinite(wrapped(**batch, unit_mask=keep).logits).all()


# ---------------------------------------------------------------- prefix reuse


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_prefix_reuse_matches_full_forward(architecture):
    model = build_tiny_model(architecture)
    batch = make_batch(architecture)
    wrapped = AttentionMaskedModel(model)
    assert wrapped.supports_prefix_reuse
    seq_len = batch["input_ids"].shape[1]
    clean_plan = wrapped.make_plan(batch, record_blocks=True)
    with torch.no_grad():
        wrapped.run_plan(clean_plan, **batch)
    assert sorted(clean_plan.recorded_blocks) == list(range(wrapped.num_blocks))

    rows = torch.tensor([0, 0, 2, 1])  # several candidate masks per example, as a search sends them
    queries = {name: value[rows] for name, value in batch.items()}
    for start_block in range(1, wrapped.num_blocks):
        keep = torch.ones(4, wrapped.num_layers, wrapped.num_heads, seq_len, seq_len, dtype=torch.bool)
        keep[:, start_block:, 1, :, 2] = False
        keep[1, start_block, 0, 0, :] = False
        gates = torch.ones(4, wrapped.num_layers, wrapped.num_heads)
        gates[2, start_block, 3] = 0
        prefix = PrefixReuse(start_block, select_rows(clean_plan.recorded_blocks[start_block - 1], rows, 3))
        plan = wrapped.make_plan(queries, unit_mask=keep, head_gates=gates, prefix=prefix)
        with torch.no_grad():
            full = wrapped(**queries, unit_mask=keep, head_gates=gates).logits
            reused = wrapped.run_plan(plan, **queries).logits
        torch.testing.assert_close(reused, full, atol=1e-5, rtol=0)
        assert plan.blocks_computed == wrapped.num_blocks - start_block


def test_prefix_reuse_with_albert_layer_groups():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=4,
                          num_hidden_groups=2, num_attention_heads=4, intermediate_size=37, num_labels=2)
    model = AlbertForSequenceClassification(config).eval()
    batch = make_batch("albert")
    wrapped = AttentionMaskedModel(model)
    clean_plan = wrapped.make_plan(batch, record_blocks=True)
    with torch.no_grad():
        wrapped.run_plan(clean_plan, **batch)
    keep = torch.ones(wrapped.num_layers, wrapped.num_heads, 9, 9, dtype=torch.bool)
    keep[3, 2, :, 1] = False
    rows = torch.arange(3)
    for start_block in (1, 2, 3):
        prefix = PrefixReuse(start_block, select_rows(clean_plan.recorded_blocks[start_block - 1], rows, 3))
        with torch.no_grad():
            reused = wrapped.run_plan(wrapped.make_plan(batch, unit_mask=keep, prefix=prefix), **batch).logits
            full = wrapped(**batch, unit_mask=keep).logits
        torch.testing.assert_close(reused, full, atol=1e-5, rtol=0)


def test_prefix_reuse_rejects_masks_below_start():
    wrapped = AttentionMaskedModel(build_tiny_model("bert"))
    batch = make_batch("bert")
    keep = all_keep(wrapped, 9)
    keep[0, 0, 0, 1] = False
    prefix = PrefixReuse(1, None)
    with pytest.raises(ValueError, match=r"masks layers \[0\]"):
        wrapped.make_plan(batch, unit_mask=keep, prefix=prefix)
    gates = torch.ones(2, 4)
    gates[0, 1] = 0
    with pytest.raises(ValueError, match="head_gates gate a layer below"):
        wrapped.make_plan(batch, head_gates=gates, prefix=prefix)
    with pytest.raises(ValueError, match=r"start_block must be in \[0, 2\)"):
        wrapped.make_plan(batch, prefix=PrefixReuse(2, None))


# ---------------------------------------------------------------- first-token passes


def _last_layer_masks(wrapped, num_sequences, seq_len):
    keep = torch.ones(num_sequences, wrapped.num_layers, wrapped.num_heads, seq_len, seq_len, dtype=torch.bool)
    keep[:, -1, 1, :, 2] = False  # a key column of the last layer, row 0 included
    keep[0, -1, 0, 0, :] = False  # row 0 of the last layer emptied for the first sequence
    keep[1, 0, 2, 3, :4] = False  # a first-layer mask, which every position still feels
    gates = torch.ones(num_sequences, wrapped.num_layers, wrapped.num_heads)
    gates[2 % num_sequences, -1, 3] = 0
    return keep, gates


@pytest.mark.parametrize("architecture", ENCODERS)
def test_first_token_pass_matches_full_forward(architecture):
    wrapped = AttentionMaskedModel(build_tiny_model(architecture))
    assert wrapped.supports_first_token_only
    batch = make_batch(architecture)
    keep, gates = _last_layer_masks(wrapped, 3, batch["input_ids"].shape[1])
    plan = wrapped.make_plan(batch, unit_mask=keep, head_gates=gates, first_token_only=True)
    with torch.no_grad():
        full = wrapped(**batch, unit_mask=keep, head_gates=gates).logits
        first_token = wrapped.run_plan(plan, **batch).logits
        again = wrapped(**batch, unit_mask=keep, head_gates=gates).logits  # the hooks are idle outside the plan
    torch.testing.assert_close(first_token, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, full, atol=0, rtol=0)


@pytest.mark.parametrize("architecture", [a for a in ENCODERS if a != "deberta"])  # DeBERTa v1 has no multiple-choice class
def test_first_token_pass_multiple_choice(architecture):
    wrapped = AttentionMaskedModel(build_tiny_model(architecture, "multiple-choice"))
    assert wrapped.supports_first_token_only
    flat = make_batch(architecture, lengths=(9, 6, 4, 8, 9, 5))
    batch = {name: value.reshape(2, 3, -1) for name, value in flat.items()}
    keep, gates = _last_layer_masks(wrapped, 6, 9)
    clean = wrapped.make_plan(batch, record_blocks=True)
    with torch.no_grad():
        wrapped.run_plan(clean, **batch)
        keep[1, 0] = True  # nothing below the last block is masked, so the pass can start there
        resumed_full = wrapped(**batch, unit_mask=keep, head_gates=gates).logits
        prefix = PrefixReuse(wrapped.num_blocks - 1, clean.recorded_blocks[wrapped.num_blocks - 2])
        plan = wrapped.make_plan(batch, unit_mask=keep, head_gates=gates, prefix=prefix, first_token_only=True)
        resumed = wrapped.run_plan(plan, **batch).logits
    torch.testing.assert_close(resumed, resumed_full, atol=1e-5, rtol=0)
    assert plan.blocks_computed == 1


def test_first_token_pass_with_albert_inner_groups():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2, inner_group_num=2,
                          num_attention_heads=4, intermediate_size=37, num_labels=2)
    torch.manual_seed(0)
    wrapped = AttentionMaskedModel(AlbertForSequenceClassification(config).eval())
    assert wrapped.num_layers == 4
    batch = make_batch("albert")
    keep, gates = _last_layer_masks(wrapped, 3, 9)
    plan = wrapped.make_plan(batch, unit_mask=keep, head_gates=gates, first_token_only=True)
    with torch.no_grad():
        full = wrapped(**batch, unit_mask=keep, head_gates=gates).logits
        first_token = wrapped.run_plan(plan, **batch).logits
    torch.testing.assert_close(first_token, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "architecture, task", [("gpt2", "sequence-classification"), ("llama", "sequence-classification"),
                           ("bert", "token-classification"), ("bert", "base")],
)
def test_first_token_pass_rejected_for_other_heads(architecture, task):
    wrapped = AttentionMaskedModel(build_tiny_model(architecture, task))
    assert not wrapped.supports_first_token_only
    with pytest.raises(ValueError, match="first_token_only=False"):
        wrapped.make_plan(make_batch(architecture), first_token_only=True)


def test_electra_choice_needs_first_summary():
    model = build_tiny_model("electra", "multiple-choice")
    assert AttentionMaskedModel(model).supports_first_token_only
    model.config.summary_type = "last"
    assert not AttentionMaskedModel(model).supports_first_token_only


def test_first_token_pass_needs_unchunked_feed_forward():
    model = build_tiny_model("bert")
    model.config.chunk_size_feed_forward = 3
    for layer in model.bert.encoder.layer:
        layer.chunk_size_feed_forward = 3  # the layers copy the setting when they are built
    assert not AttentionMaskedModel(model).supports_first_token_only


@pytest.mark.parametrize("architecture", ["roberta", "electra", "deberta"])
def test_first_token_pass_rejects_replaced_head(architecture):
    class MeanPooledHead(nn.Module):
        """A head that reads every position, as a user might swap in."""

        def __init__(self, hidden_size: int, num_labels: int) -> None:
            super().__init__()
            self.linear = nn.Linear(hidden_size, num_labels)

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return self.linear(hidden_states.mean(dim=1))

    model = build_tiny_model(architecture)
    assert AttentionMaskedModel(model).supports_first_token_only  # before the swap
    if architecture == "deberta":
        model.pooler = nn.Identity()  # DeBERTa's pooler takes position 0, so it goes too
    model.classifier = MeanPooledHead(32, 3)
    assert not AttentionMaskedModel(model).supports_first_token_only
