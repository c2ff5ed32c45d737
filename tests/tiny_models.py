"""Tiny randomly initialised models of every supported family, built from configs."""

from __future__ import annotations

import torch
from transformers import (
    AlbertConfig,
    AutoModel,
    AutoModelForMultipleChoice,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    DebertaConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    GPT2Config,
    LlamaConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

VOCAB_SIZE = 99
PAD_ID = 0

_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=37, max_position_embeddings=64, pad_token_id=PAD_ID,
               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def _config(architecture: str):
    if architecture == "bert":
        return BertConfig(**_COMMON)
    if architecture == "roberta":
        return RobertaConfig(**{**_COMMON, "pad_token_id": 1})
    if architecture == "xlm-roberta":
        return XLMRobertaConfig(**{**_COMMON, "pad_token_id": 1})
    if architecture == "electra":
        return ElectraConfig(**_COMMON, embedding_size=16)
    if architecture == "albert":
        return AlbertConfig(**_COMMON, embedding_size=16, num_hidden_groups=1)
    if architecture == "distilbert":
        return DistilBertConfig(vocab_size=VOCAB_SIZE, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                max_position_embeddings=64, pad_token_id=PAD_ID)
    if architecture == "deberta":
        return DebertaConfig(**_COMMON, relative_attention=True, pos_att_type=["c2p", "p2c"],
                             max_relative_positions=16, type_vocab_size=0)
    if architecture == "deberta-v2":
        return DebertaV2Config(**_COMMON, relative_attention=True, pos_att_type=["c2p", "p2c"],
                               max_relative_positions=16, position_buckets=8, type_vocab_size=0)
    if architecture == "gpt2":
        return GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                          pad_token_id=PAD_ID, bos_token_id=2, eos_token_id=2)
    if architecture == "llama":
        return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           pad_token_id=PAD_ID)
    raise ValueError(f"unknown architecture {architecture!r}")


ENCODERS = ("bert", "roberta", "xlm-roberta", "electra", "albert", "distilbert", "deberta", "deberta-v2")
DECODERS = ("gpt2", "llama")
ARCHITECTURES = ENCODERS + DECODERS
SDPA_ARCHITECTURES = ("bert", "roberta", "xlm-roberta", "electra", "albert", "distilbert", "gpt2", "llama")

_AUTO_CLASSES = {
    "sequence-classification": AutoModelForSequenceClassification,
    "multiple-choice": AutoModelForMultipleChoice,
    "token-classification": AutoModelForTokenClassification,
    "base": AutoModel,
}


def build_tiny_model(architecture: str, task: str = "sequence-classification", *, num_labels: int = 3,
                     attn_implementation: str = "eager", dtype: torch.dtype = torch.float32, seed: int = 0):
    """Build a tiny model in eval mode with fixed random weights."""
    config = _config(architecture)
    config.num_labels = num_labels
    torch.manual_seed(seed)
    model = _AUTO_CLASSES[task].from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def make_batch(architecture: str, lengths=(9, 6, 4), seq_len: int | None = None, seed: int = 1):
    """Random token ids with right padding and mixed lengths; returns input_ids and attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    seq_len = seq_len or max(lengths)
    input_ids = torch.randint(3, VOCAB_SIZE, (len(lengths), seq_len), generator=generator)
    attention_mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    pad_id = 1 if architecture in ("roberta", "xlm-roberta") else PAD_ID
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
