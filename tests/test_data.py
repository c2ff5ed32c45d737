"""Tests of dataset loading and tokenization: the SST-2 and DREAM files, other files and bad input."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
from transformers import BertTokenizerFast

from attend_robust.data import (
    CLASSIFICATION,
    MULTIPLE_CHOICE,
    encode_dataset,
    label_names_of,
    load_task_dataset,
    num_labels_of,
    resolve_data_dir,
    task_kind,
)

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a an and of to is in it that film movie good bad not with for this as but very story , . ' s m w : ? "
    "what does man woman do he she you i"
).split()


def build_tiny_tokenizer() -> BertTokenizerFast:
    """Build a WordPiece tokenizer with a 44-word vocabulary; other words become [UNK]."""
    # transformers 5 takes the vocabulary as `vocab` and ignores a `vocab_file` keyword.
    return BertTokenizerFast(vocab={token: index for index, token in enumerate(TINY_VOCAB)})


@pytest.fixture
def tokenizer():
    tokenizer = build_tiny_tokenizer()
    assert len(tokenizer) == len(TINY_VOCAB)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# SST-2 and DREAM from the local files
# ---------------------------------------------------------------------------------------------


def test_sst2_dev_columns_and_counts(shared_data):
    dev = load_task_dataset("sst2", "dev", data_dir=shared_data)
    assert dev.column_names == ["example_id", "text", "label"]
    assert len(dev) == 872
    assert sum(dev["label"]) == 444
    assert dev[0]["example_id"] == "0"
    assert task_kind(dev) == CLASSIFICATION
    assert num_labels_of(dev) == 2
    assert label_names_of(dev) == ["negative", "positive"]


def test_sst2_validation_alias(shared_data):
    dev = load_task_dataset("sst2", "dev", data_dir=shared_data, limit=5)
    validation = load_task_dataset("sst2", "validation", data_dir=shared_data, limit=5)
    assert dev["example_id"] == validation["example_id"]


def test_sst2_keeps_quote_characters(shared_data):
    dev = load_task_dataset("sst2", "dev", data_dir=shared_data)
    assert any('"' in text or "'" in text for text in dev["text"])
    assert all(isinstance(text, str) and text.strip() for text in dev["text"])


def test_dream_dev_columns_and_labels(shared_data):
    dev = load_task_dataset("dream", "dev", data_dir=shared_data)
    assert len(dev) == 2040
    assert dev.column_names == ["example_id", "context", "question", "choices", "label"]
    assert task_kind(dev) == MULTIPLE_CHOICE
    assert num_labels_of(dev) == 3
    assert label_names_of(dev) is None

    raw = json.loads((shared_data / "dream" / "dev.json").read_text())
    turns, questions, dialogue_id = raw[0]
    first = dev[0]
    assert first["example_id"] == f"{dialogue_id}-0"
    assert first["context"] == "\n".join(turns)
    assert first["question"] == questions[0]["question"]
    assert first["choices"][first["label"]] == questions[0]["answer"]


def test_dream_example_ids_unique(shared_data):
    train = load_task_dataset("dream", "train", data_dir=shared_data)
    assert len(train) == 6116
    assert len(set(train["example_id"])) == len(train)


def test_limit_is_seeded_and_ordered(shared_data):
    first = load_task_dataset("sst2", "dev", data_dir=shared_data, limit=50, seed=3)
    again = load_task_dataset("sst2", "dev", data_dir=shared_data, limit=50, seed=3)
    other_seed = load_task_dataset("sst2", "dev", data_dir=shared_data, limit=50, seed=4)
    ids = [int(example_id) for example_id in first["example_id"]]
    assert len(first) == 50
    assert first["example_id"] == again["example_id"]
    assert first["example_id"] != other_seed["example_id"]
    assert ids == sorted(ids)


def test_limit_larger_than_split(shared_data):
    dev = load_task_dataset("dream", "dev", data_dir=shared_data, limit=10_000)
    assert len(dev) == 2040


@pytest.mark.parametrize("limit", [0, -3, 2.5])
def test_limit_invalid(shared_data, limit):
    with pytest.raises(ValueError, match="limit must be a positive"):
        load_task_dataset("sst2", "dev", data_dir=shared_data, limit=limit)


def test_unknown_split_names_choices(shared_data):
    with pytest.raises(ValueError, match="Unknown split 'test'.*'dev'"):
        load_task_dataset("sst2", "test", data_dir=shared_data)


def test_missing_local_file_names_path(tmp_path):
    (tmp_path / "sst2").mkdir()
    with pytest.raises(FileNotFoundError, match="train.tsv"):
        load_task_dataset("sst2", "train", data_dir=tmp_path)


def test_missing_data_dir_names_source(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTEND_ROBUST_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="ATTEND_ROBUST_DATA_DIR"):
        resolve_data_dir()


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTEND_ROBUST_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path


def test_data_dir_none_without_default(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTEND_ROBUST_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir() is None


def test_hub_fallback_calls_load_dataset(tmp_path, monkeypatch):
    # With no data folder, DREAM is requested from the hub. A stand-in for load_dataset returns the
    # hub's layout (one row per question), so the conversion is checked offline.
    monkeypatch.delenv("ATTEND_ROBUST_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    requests = []

    def fake_load_dataset(path, *args, split=None, **kwargs):
        requests.append((path, args, split))
        return datasets.Dataset.from_list([
            {"id": 0, "dialogue_id": "4-1", "dialogue": ["M: Hi.", "W: Hello."], "question": "Who?",
             "choice": ["x", "y", "z"], "answer": "y"},
            {"id": 1, "dialogue_id": "4-1", "dialogue": ["M: Hi.", "W: Hello."], "question": "Why?",
             "choice": ["p", "q", "r"], "answer": "r"},
        ])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dev = load_task_dataset("dream", "dev")
    assert requests == [("dataset-org/dream", (), "validation")]
    assert dev["example_id"] == ["4-1-0", "4-1-1"]
    assert dev["label"] == [1, 2]
    assert dev[0]["context"] == "M: Hi.\nW: Hello."


def test_hub_failure_says_what_to_check(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTEND_ROBUST_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)

    def offline(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="No local copy of SST-2 was found.*ATTEND_ROBUST_DATA_DIR"):
        load_task_dataset("sst2", "dev")
    with pytest.raises(ConnectionError, match="'sst3' is neither a built-in dataset"):
        load_task_dataset("sst3", "dev")


# ---------------------------------------------------------------------------------------------
# Other local files and column mapping
# ---------------------------------------------------------------------------------------------


def test_csv_pair_columns_mapped(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("premise,hypothesis,gold\nit is good,it is bad,1\na film,a movie,0\nnull,the story,2\n")
    dataset = load_task_dataset(str(path), "train", label_column="gold")
    assert dataset.column_names == ["example_id", "text", "label", "text_pair"]
    assert dataset["text"] == ["it is good", "a film", "null"]
    assert dataset["text_pair"] == ["it is bad", "a movie", "the story"]
    assert dataset["example_id"] == ["0", "1", "2"]
    assert num_labels_of(dataset) == 3


def test_jsonl_multiple_choice_with_letters(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [
        {"id": "q1", "article": "the film", "question": "what ?", "options": ["a", "b", "c", "d"], "answer": "C"},
        {"id": "q2", "article": "the story", "question": "what ?", "options": ["e", "f", "g", "h"], "answer": "f"},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    dataset = load_task_dataset(str(path), "train")
    assert task_kind(dataset) == MULTIPLE_CHOICE
    assert dataset["example_id"] == ["q1", "q2"]
    assert dataset["label"] == [2, 1]
    assert dataset["context"] == ["the film", "the story"]


def test_folder_of_split_files(tmp_path):
    (tmp_path / "train.tsv").write_text('text\tlabel\nsay "hi"\t1\nbad\t0\n')
    (tmp_path / "validation.tsv").write_text("text\tlabel\ngood\t1\n")
    assert load_task_dataset(str(tmp_path), "train")["text"] == ['say "hi"', "bad"]
    assert load_task_dataset(str(tmp_path), "dev")["text"] == ["good"]


def test_folder_missing_split_file(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,1\n")
    with pytest.raises(FileNotFoundError, match="No file for split 'dev'"):
        load_task_dataset(str(tmp_path), "dev")


def test_missing_file_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_task_dataset(str(tmp_path / "absent.csv"), "train")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("text,label\n")
    with pytest.raises(ValueError, match="extension must be one of"):
        load_task_dataset(str(path), "train")


def test_missing_text_column_lists_columns(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("review,label\ngood,1\n")
    with pytest.raises(ValueError, match=r"columns are \['review', 'label'\]. Pass text_column="):
        load_task_dataset(str(path), "train")


def test_mapped_column_not_found(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("review,label\ngood,1\n")
    with pytest.raises(ValueError, match="text_column='body' is not a column"):
        load_task_dataset(str(path), "train", text_column="body")


def test_text_column_mapping(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("review,label\ngood,1\n")
    assert load_task_dataset(str(path), "train", text_column="review")["text"] == ["good"]


def test_string_labels_rejected(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\ngood,positive\nbad,negative\n")
    with pytest.raises(ValueError, match="label 'positive'.*class_encode_column"):
        load_task_dataset(str(path), "train")


def test_negative_labels_rejected(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\ngood,-1\n")
    with pytest.raises(ValueError, match="label -1.*unlabelled"):
        load_task_dataset(str(path), "train")


def test_choice_label_not_found(tmp_path):
    path = tmp_path / "mc.json"
    path.write_text(json.dumps([{"question": "what ?", "choices": ["a", "b"], "label": "z"}]))
    with pytest.raises(ValueError, match="label 'z'.*choices \\['a', 'b'\\]"):
        load_task_dataset(str(path), "train")


def test_uneven_choice_counts_rejected(tmp_path):
    path = tmp_path / "mc.json"
    path.write_text(json.dumps([
        {"question": "what ?", "choices": ["a", "b"], "label": 0},
        {"question": "why ?", "choices": ["a", "b", "c"], "label": 1},
    ]))
    with pytest.raises(ValueError, match="different numbers of choices \\[2, 3\\]"):
        load_task_dataset(str(path), "train")


def test_task_kind_unknown_columns():
    with pytest.raises(ValueError, match="Cannot tell the task"):
        task_kind(datasets.Dataset.from_dict({"review": ["good"]}))


# ---------------------------------------------------------------------------------------------
# encode_dataset
# ---------------------------------------------------------------------------------------------


def test_encode_classification_keeps_columns(shared_data, tokenizer):
    dev = load_task_dataset("sst2", "dev", data_dir=shared_data, limit=20)
    encoded = encode_dataset(dev, tokenizer, max_length=16)
    for column in ("example_id", "text", "label", "input_ids", "attention_mask", "token_type_ids", "truncated"):
        assert column in encoded.column_names
    assert encoded["example_id"] == dev["example_id"]
    assert all(len(ids) <= 16 for ids in encoded["input_ids"])
    assert all(ids[0] == tokenizer.cls_token_id for ids in encoded["input_ids"])
    assert all(ids[-1] == tokenizer.sep_token_id for ids in encoded["input_ids"])


def test_encode_counts_truncation(tokenizer, caplog):
    dataset = datasets.Dataset.from_dict({
        "example_id": ["short", "long"], "text": ["good film", " ".join(["good"] * 30)], "label": [1, 1],
    })
    with caplog.at_level(logging.INFO, logger="attend_robust.data"):
        encoded = encode_dataset(dataset, tokenizer, max_length=10)
    assert encoded["truncated"] == [False, True]
    assert [len(ids) for ids in encoded["input_ids"]] == [4, 10]
    assert tokenizer.convert_ids_to_tokens(encoded[0]["input_ids"]) == ["[CLS]", "good", "film", "[SEP]"]
    assert "1 were truncated" in caplog.text


def test_encode_sentence_pairs_mixed_with_singles(tokenizer):
    dataset = datasets.Dataset.from_dict({
        "example_id": ["0", "1"], "text": ["good", "bad"], "text_pair": ["film", None], "label": [1, 0],
    })
    encoded = encode_dataset(dataset, tokenizer, max_length=16)
    assert encoded[0]["token_type_ids"] == [0, 0, 0, 1, 1]
    assert encoded[1]["token_type_ids"] == [0, 0, 0]


def test_encode_multiple_choice_shape(shared_data, tokenizer):
    dev = load_task_dataset("dream", "dev", data_dir=shared_data, limit=12)
    encoded = encode_dataset(dev, tokenizer, max_length=32)
    assert encoded["example_id"] == dev["example_id"]
    assert encoded["label"] == dev["label"]
    for row in encoded:
        # input_ids: [C, S_row] with C = 3 choices.
        assert len(row["input_ids"]) == 3
        assert all(len(ids) <= 32 for ids in row["input_ids"])
        assert len({len(ids) for ids in row["attention_mask"]}) >= 1
    assert sum(encoded["truncated"]) > 0


def test_encode_multiple_choice_truncates_context_left(tokenizer):
    dataset = datasets.Dataset.from_dict({
        "example_id": ["0"], "context": ["the " + " ".join(["story"] * 40)], "question": ["what does he do ?"],
        "choices": [["good film", "bad", "the movie"]], "label": [0],
    })
    encoded = encode_dataset(dataset, tokenizer, max_length=16)
    first_choice = tokenizer.convert_ids_to_tokens(encoded[0]["input_ids"][0])
    assert len(first_choice) == 16
    # The question and the choice survive, and the start of the context ("the") is dropped.
    assert first_choice[-9:] == ["what", "does", "he", "do", "?", "[SEP]", "good", "film", "[SEP]"]
    assert first_choice[:2] == ["[CLS]", "story"]
    assert encoded["truncated"] == [True]
    assert tokenizer.truncation_side == "right"


def test_encode_long_choice_falls_back(tokenizer, caplog):
    dataset = datasets.Dataset.from_dict({
        "example_id": ["0"], "context": ["the story"], "question": ["what ?"],
        "choices": [[" ".join(["good"] * 20), "bad", "a film"]], "label": [0],
    })
    with caplog.at_level(logging.WARNING, logger="attend_robust.data"):
        encoded = encode_dataset(dataset, tokenizer, max_length=10)
    assert [len(ids) for ids in encoded[0]["input_ids"]] == [10, 8, 9]
    assert "longest_first" in caplog.text


def test_encode_empty_text_raises(tokenizer):
    dataset = datasets.Dataset.from_dict({"example_id": ["a", "b"], "text": ["good", "  "], "label": [1, 0]})
    with pytest.raises(ValueError, match=r"1 example\(s\) have empty text.*\['b'\].*drop_empty=True"):
        encode_dataset(dataset, tokenizer)


def test_encode_empty_text_dropped(tokenizer):
    dataset = datasets.Dataset.from_dict({"example_id": ["a", "b"], "text": ["good", ""], "label": [1, 0]})
    encoded = encode_dataset(dataset, tokenizer, drop_empty=True)
    assert encoded["example_id"] == ["a"]


def test_encode_empty_choice_raises(tokenizer):
    dataset = datasets.Dataset.from_dict({
        "example_id": ["q"], "context": ["the story"], "question": ["what ?"], "choices": [["good", ""]],
        "label": [0],
    })
    with pytest.raises(ValueError, match="empty text.*\\['q'\\]"):
        encode_dataset(dataset, tokenizer)


def test_encode_max_length_too_small(tokenizer):
    dataset = datasets.Dataset.from_dict({"example_id": ["a"], "text": ["good"], "label": [1]})
    with pytest.raises(ValueError, match="max_length=4 is too small"):
        encode_dataset(dataset, tokenizer, max_length=4)
