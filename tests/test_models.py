"""Loading fine-tuned models to attack: adapter folders, and checkpoints with the head of the other task."""

from __future__ import annotations

import pytest
import torch
from hackattend_support import flippy_bert, predict
from transformers import AutoModelForSequenceClassification

from attend_robust import AttentionMaskedModel
from attend_robust.models import load_fine_tuned

peft = pytest.importorskip("peft")


def test_adapter_folder_loads_on_its_base(tmp_path):
    flippy_bert(100).save_pretrained(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    # The adapter records the base model's folder, from which transformers loads it again.
    lora = peft.LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    adapted = peft.get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", attn_implementation="eager"), lora
    )
    adapted.save_pretrained(tmp_path / "adapter")
    inputs = {"input_ids": torch.tensor([[5, 17, 42, 9]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}

    loaded = load_fine_tuned(str(tmp_path / "adapter"), multiple_choice=False, attn_implementation="eager").eval()
    expected = predict(AttentionMaskedModel(adapted.eval()), inputs)
    assert torch.allclose(predict(AttentionMaskedModel(loaded), inputs), expected, atol=1e-6)
    assert not torch.allclose(predict(AttentionMaskedModel(base), inputs), expected, atol=1e-6)


def test_head_of_other_task_rejected(tmp_path):
    flippy_bert(100, multiple_choice=True).save_pretrained(tmp_path / "choices")
    with pytest.raises(ValueError, match="is a BertForMultipleChoice checkpoint"):
        load_fine_tuned(str(tmp_path / "choices"), multiple_choice=False)
    flippy_bert(100).save_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match="the dataset is multiple choice"):
        load_fine_tuned(str(tmp_path / "classifier"), multiple_choice=True)
