"""Loading and tokenizing classification and multiple-choice datasets with one set of column names.

Every dataset that `load_task_dataset` returns has one of two layouts:

- classification: `example_id` (str), `text` (str), `text_pair` (str or None, present only for
  sentence-pair data) and `label` (a `ClassLabel`, so `num_labels_of` returns the full label set even
  for a subset that lacks a class);
- multiple choice: `example_id` (str), `context` (str), `question` (str), `choices` (list of str, the
  same number C for every row) and `label` (int, the index of the correct choice).

`encode_dataset` adds `input_ids`, `attention_mask`, `token_type_ids` (when the tokenizer returns
them) and a boolean `truncated` column, keeping every column it was given. Rows are not padded:
`transformers.DataCollatorWithPadding` (classification) or
`transformers.DataCollatorForMultipleChoice` pad each batch.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Literal

import datasets

logger = logging.getLogger(__name__)

CLASSIFICATION = "classification"
MULTIPLE_CHOICE = "multiple-choice"
TaskKind = Literal["classification", "multiple-choice"]

DATA_DIR_ENV = "ATTEND_ROBUST_DATA_DIR"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"

SST2_HUB_NAME = "nyu-mll/glue"
SST2_HUB_CONFIG = "sst2"
SST2_LABEL_NAMES = ["negative", "positive"]
DREAM_HUB_NAME = "dataset-org/dream"

# Split names accepted for the built-in datasets, mapped to the local file stem and the hub split.
_LOCAL_SPLIT_STEMS = {"train": "train", "dev": "dev", "validation": "dev"}
_HUB_SPLITS = {"train": "train", "dev": "validation", "validation": "validation", "test": "test"}
_FILE_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl")

# Column names tried in order when no mapping argument is given.
_TEXT_COLUMNS = ("text", "sentence", "sentence1", "premise", "question1")
_TEXT_PAIR_COLUMNS = ("text_pair", "sentence2", "hypothesis", "question2")
_LABEL_COLUMNS = ("label", "labels", "answer")
_CHOICES_COLUMNS = ("choices", "choice", "endings", "options")
_CONTEXT_COLUMNS = ("context", "dialogue", "article", "passage", "ctx")
_QUESTION_COLUMNS = ("question", "query")
_ID_COLUMNS = ("example_id", "id", "idx", "guid")


# ---------------------------------------------------------------------------------------------
# Data folder and split names
# ---------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Find the folder that contains local copies of the built-in datasets (`sst2/`, `dream/`).

    Args:
        data_dir (`str` or `os.PathLike`, *optional*):
            The folder to use. When `None`, the environment variable `ATTEND_ROBUST_DATA_DIR` is read,
            and when that is unset too, `../shared/data` relative to the current directory is used if
            it exists.

    Returns:
        `Path` or `None`: the folder, or `None` when no folder was given and the default one does not
        exist, in which case the built-in datasets load from the Hugging Face Hub.

    Raises:
        `FileNotFoundError`: a folder given by argument or environment variable does not exist.
    """
    if data_dir is None and os.environ.get(DATA_DIR_ENV):
        data_dir = os.environ[DATA_DIR_ENV]
        source = f"the environment variable {DATA_DIR_ENV}"
    else:
        source = "the data_dir argument"
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"Data folder {str(path)!r} (from {source}) does not exist. Pass an existing folder that "
                f"contains sst2/ or dream/, or unset it to load the datasets from the Hugging Face Hub."
            )
        return path
    if DEFAULT_DATA_DIR.is_dir():
        return DEFAULT_DATA_DIR.resolve()
    return None


def _local_split_stem(name: str, split: str, folder: Path) -> str:
    if split not in _LOCAL_SPLIT_STEMS:
        raise ValueError(
            f"Unknown split {split!r} for the local {name} dataset in {str(folder)!r}. "
            f"Use one of {sorted(_LOCAL_SPLIT_STEMS)} ('validation' is an alias of 'dev')."
        )
    return _LOCAL_SPLIT_STEMS[split]


def _hub_split(name: str, split: str) -> str:
    if split not in _HUB_SPLITS:
        raise ValueError(f"Unknown split {split!r} for {name}. Use one of {sorted(_HUB_SPLITS)}.")
    return _HUB_SPLITS[split]


# ---------------------------------------------------------------------------------------------
# Built-in datasets: SST-2 and DREAM, from local files or the hub
# ---------------------------------------------------------------------------------------------


def _require_file(path: Path, dataset_name: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"{dataset_name} file {str(path)!r} not found. Point data_dir (or {DATA_DIR_ENV}) at a folder "
            f"that contains {path.parent.name}/{path.name}, or unset both to load {dataset_name} from the "
            f"Hugging Face Hub."
        )


def _load_from_hub(name: str, *args: Any, hint: str, **kwargs: Any) -> datasets.Dataset:
    """Call `datasets.load_dataset` and add `hint` to the error when the Hub cannot provide `name`."""
    try:
        return datasets.load_dataset(name, *args, **kwargs)
    except ConnectionError as error:  # offline, or the Hub unreachable
        raise ConnectionError(f"{str(error).rstrip('.')}. {hint}") from error
    except FileNotFoundError as error:  # no such dataset on the Hub
        raise FileNotFoundError(f"{str(error).rstrip('.')}. {hint}") from error


def _built_in_hint(name: str) -> str:
    return (
        f"No local copy of {name} was found, so it was requested from the Hugging Face Hub. To read local files, "
        f"pass data_dir (--data-dir) or set {DATA_DIR_ENV} to a folder that contains sst2/ and dream/."
    )


def _load_sst2(split: str, data_dir: Path | None) -> datasets.Dataset:
    if data_dir is None:
        hub = _load_from_hub(SST2_HUB_NAME, SST2_HUB_CONFIG, split=_hub_split("sst2", split),
                             hint=_built_in_hint("SST-2"))
        hub = hub.map(lambda row: {"example_id": str(row["idx"])}, remove_columns=["idx"])
        return hub.rename_column("sentence", "text")

    path = data_dir / "sst2" / f"{_local_split_stem('sst2', split, data_dir)}.tsv"
    _require_file(path, "SST-2")
    # QUOTE_NONE because SST-2 sentences contain bare quote characters, and keep_default_na=False so
    # that a sentence such as "null" stays a string.
    table = _load_delimited_file(path)
    _check_columns(table, ["text", "label"], path)
    # Row numbers as ids match the `idx` column of the GLUE copy on the hub.
    table = table.add_column("example_id", [str(index) for index in range(len(table))])
    return table.cast_column("label", datasets.ClassLabel(names=SST2_LABEL_NAMES))


def _dream_records_from_json(raw: Any, path: Path) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise ValueError(
            f"DREAM file {str(path)!r} must contain a JSON list of [dialogue_turns, questions, id] "
            f"entries, but its top level is a {type(raw).__name__}."
        )
    records = []
    for position, entry in enumerate(raw):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ValueError(
                f"Entry {position} of DREAM file {str(path)!r} is not a [dialogue_turns, questions, id] "
                f"list: {str(entry)[:200]!r}."
            )
        turns, questions, dialogue_id = entry
        for question_index, item in enumerate(questions):
            example_id = f"{dialogue_id}-{question_index}"
            choices = list(item["choice"])
            if item["answer"] not in choices:
                raise ValueError(
                    f"DREAM question {example_id} in {str(path)!r} has answer {item['answer']!r}, which is "
                    f"not one of its choices {choices}. Fix or remove that question."
                )
            records.append({
                "example_id": example_id,
                "context": "\n".join(turns),
                "question": item["question"],
                "choices": choices,
                "label": choices.index(item["answer"]),
            })
    return records


_MULTIPLE_CHOICE_FEATURES = datasets.Features({
    "example_id": datasets.Value("string"),
    "context": datasets.Value("string"),
    "question": datasets.Value("string"),
    "choices": datasets.Sequence(datasets.Value("string")),
    "label": datasets.Value("int64"),
})


def _dream_hub_to_records(hub: datasets.Dataset) -> list[dict[str, Any]]:
    # The hub copy has one row per question. Number the questions of each dialogue in row order so
    # that ids read `<dialogue id>-<question index>`, as for the local files.
    seen_per_dialogue: dict[str, int] = {}
    records = []
    for row in hub:
        dialogue_id = str(row["dialogue_id"])
        question_index = seen_per_dialogue.get(dialogue_id, 0)
        seen_per_dialogue[dialogue_id] = question_index + 1
        choices = list(row["choice"])
        records.append({
            "example_id": f"{dialogue_id}-{question_index}",
            "context": "\n".join(row["dialogue"]),
            "question": row["question"],
            "choices": choices,
            "label": choices.index(row["answer"]),
        })
    return records


def _load_dream(split: str, data_dir: Path | None) -> datasets.Dataset:
    if data_dir is None:
        hub = _load_from_hub(DREAM_HUB_NAME, split=_hub_split("dream", split), hint=_built_in_hint("DREAM"))
        return datasets.Dataset.from_list(_dream_hub_to_records(hub), features=_MULTIPLE_CHOICE_FEATURES)

    path = data_dir / "dream" / f"{_local_split_stem('dream', split, data_dir)}.json"
    _require_file(path, "DREAM")
    # The file is a list of lists, which the `json` builder of `datasets` cannot read as rows.
    with path.open(encoding="utf-8") as handle:
        raw = json.load(handle)
    records = _dream_records_from_json(raw, path)
    return datasets.Dataset.from_list(records, features=_MULTIPLE_CHOICE_FEATURES)


# ---------------------------------------------------------------------------------------------
# Other datasets: local files, folders of split files, hub names
# ---------------------------------------------------------------------------------------------


def _load_delimited_file(path: Path) -> datasets.Dataset:
    if path.suffix == ".tsv":
        # TSV files in GLUE style have no quoting, so quote characters are kept as they are.
        return datasets.load_dataset(
            "csv", data_files=str(path), split="train", delimiter="\t", quoting=csv.QUOTE_NONE,
            keep_default_na=False,
        )
    return datasets.load_dataset("csv", data_files=str(path), split="train", keep_default_na=False)


def _load_file(path: Path) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _load_delimited_file(path)
    if suffix in (".json", ".jsonl"):
        return datasets.load_dataset("json", data_files=str(path), split="train")
    raise ValueError(
        f"Unsupported data file {str(path)!r}: the extension must be one of {list(_FILE_EXTENSIONS)}."
    )


def _find_split_file(folder: Path, split: str) -> Path:
    stems = [split]
    if split in ("dev", "validation"):
        stems = ["dev", "validation"]
    candidates = [folder / f"{stem}{suffix}" for stem in stems for suffix in _FILE_EXTENSIONS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"No file for split {split!r} in folder {str(folder)!r}: looked for "
        f"{[candidate.name for candidate in candidates]}. Add one of them or pass another split."
    )


def _load_other(name_or_path: str, split: str) -> datasets.Dataset:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _load_file(_find_split_file(path, split))
    if path.is_file():
        # A single file is one split, so `split` does not select anything here.
        return _load_file(path)
    if path.suffix.lower() in _FILE_EXTENSIONS or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"Data file {name_or_path!r} not found. Check the path, or pass a hub dataset name instead."
        )
    # Hub datasets name their dev split "validation".
    return _load_from_hub(
        name_or_path, split="validation" if split == "dev" else split,
        hint=(
            f"{name_or_path!r} is neither a built-in dataset (sst2, dream) nor a local file or folder, so it "
            "was requested from the Hub. Check the name, or pass the path of a .csv, .tsv, .json or .jsonl file."
        ),
    )


# ---------------------------------------------------------------------------------------------
# Column mapping and checks
# ---------------------------------------------------------------------------------------------


def _values(dataset: datasets.Dataset, column: str) -> list:
    # `dataset[column]` is a lazy column in datasets 5.2, and iterating it decodes one row at a
    # time. Slicing it returns a plain list in one step.
    return dataset[column][:]


def _check_columns(dataset: datasets.Dataset, required: list[str], source: Any) -> None:
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Dataset {str(source)!r} has no column {missing[0]!r}; its columns are {dataset.column_names}. "
            f"Pass the matching column name with the column mapping arguments (for example text_column=...)."
        )


def _pick_column(dataset: datasets.Dataset, given: str | None, candidates: tuple[str, ...], role: str,
                 source: str, *, required: bool) -> str | None:
    if given is not None:
        if given not in dataset.column_names:
            raise ValueError(
                f"{role}={given!r} is not a column of dataset {source!r}; its columns are {dataset.column_names}."
            )
        return given
    for candidate in candidates:
        if candidate in dataset.column_names:
            return candidate
    if required:
        raise ValueError(
            f"Dataset {source!r} has none of the columns {list(candidates)} expected for {role}; its "
            f"columns are {dataset.column_names}. Pass {role}=<column name> "
            f"(--{role.replace('_', '-')} on the attend-robust command line)."
        )
    return None


def _example_ids(dataset: datasets.Dataset) -> list[str]:
    for column in _ID_COLUMNS:
        if column in dataset.column_names:
            ids = [str(value) for value in _values(dataset, column)]
            if len(set(ids)) == len(ids):
                return ids
            logger.warning("Column %r has repeated values, so row numbers are used as example ids.", column)
            break
    return [str(index) for index in range(len(dataset))]


def _label_to_choice_index(value: Any, choices: list[str], example_id: str, label_column: str) -> int:
    num_choices = len(choices)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < num_choices:
        return value
    if isinstance(value, str):
        if value in choices:
            return choices.index(value)
        stripped = value.strip()
        if stripped.isdigit() and int(stripped) < num_choices:
            return int(stripped)
        if len(stripped) == 1 and "A" <= stripped.upper() < chr(ord("A") + num_choices):
            return ord(stripped.upper()) - ord("A")
    raise ValueError(
        f"Example {example_id}: label {value!r} in column {label_column!r} is neither a choice index in "
        f"[0, {num_choices}), a letter A-{chr(ord('A') + num_choices - 1)}, nor the text of one of its "
        f"choices {choices}. Fix the label or pass another label_column."
    )


def _standardize_multiple_choice(dataset: datasets.Dataset, source: str, *, choices_column: str,
                                 label_column: str, context_column: str | None,
                                 question_column: str | None) -> datasets.Dataset:
    ids = _example_ids(dataset)
    records = []
    for example_id, row in zip(ids, dataset):
        context = row[context_column] if context_column else ""
        if isinstance(context, list):
            context = "\n".join(context)
        choices = [str(choice) for choice in row[choices_column]]
        records.append({
            "example_id": example_id,
            "context": context or "",
            "question": (row[question_column] if question_column else "") or "",
            "choices": choices,
            "label": _label_to_choice_index(row[label_column], choices, example_id, label_column),
        })
    choice_counts = sorted({len(record["choices"]) for record in records})
    if len(choice_counts) > 1:
        raise ValueError(
            f"Rows of dataset {source!r} have different numbers of choices {choice_counts}; every row must have "
            f"the same number so that a batch has shape [batch, choices, seq]. Split the data by choice count."
        )
    return datasets.Dataset.from_list(records, features=_MULTIPLE_CHOICE_FEATURES)


def _standardize_classification(dataset: datasets.Dataset, source: str, *, text_column: str,
                                text_pair_column: str | None, label_column: str) -> datasets.Dataset:
    label_feature = dataset.features[label_column]
    ids = _example_ids(dataset)
    columns = {
        "example_id": ids,
        "text": _values(dataset, text_column),
        "label": _values(dataset, label_column),
    }
    if text_pair_column is not None:
        columns["text_pair"] = _values(dataset, text_pair_column)
    standard = datasets.Dataset.from_dict(columns)
    if isinstance(label_feature, datasets.ClassLabel):
        return standard.cast_column("label", label_feature)
    return _cast_to_class_label(standard, source, label_column)


def _cast_to_class_label(dataset: datasets.Dataset, source: str, label_column: str) -> datasets.Dataset:
    labels = _values(dataset, "label")
    for example_id, label in zip(_values(dataset, "example_id"), labels):
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(
                f"Example {example_id} of dataset {source!r} has label {label!r} ({type(label).__name__}) in "
                f"column {label_column!r}; labels must be integer class ids 0..N-1. Convert them first, for "
                f"example with `dataset.class_encode_column({label_column!r})`."
            )
    return dataset.cast_column("label", datasets.ClassLabel(num_classes=max(labels) + 1 if labels else 0))


def _check_class_labels(dataset: datasets.Dataset, source: str, split: str) -> None:
    num_classes = dataset.features["label"].num_classes
    for example_id, label in zip(_values(dataset, "example_id"), _values(dataset, "label")):
        if not 0 <= label < num_classes:
            hint = " Test splits of GLUE carry the label -1 (unlabelled); use train or dev." if label == -1 else ""
            raise ValueError(
                f"Example {example_id} of dataset {source!r} (split {split!r}) has label {label}, outside "
                f"[0, {num_classes}).{hint}"
            )


def _take_subset(dataset: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None:
        return dataset
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive number of examples or None, not {limit!r}.")
    if limit >= len(dataset):
        return dataset
    # A seeded sample, kept in file order so that a subset reads like the file it came from.
    indices = sorted(random.Random(seed).sample(range(len(dataset)), limit))
    return dataset.select(indices)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def load_task_dataset(
    name_or_path: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    question_column: str | None = None,
    choices_column: str | None = None,
    context_column: str | None = None,
) -> datasets.Dataset:
    """Load one split of a classification or multiple-choice dataset with the standard columns.

    The layouts are described in the module docstring. `sst2` and `dream` read
    `{data_dir}/sst2/{split}.tsv` and `{data_dir}/dream/{split}.json` when a data folder is found (see
    [`resolve_data_dir`]), and otherwise load `nyu-mll/glue` (config `sst2`) and `dataset-org/dream`
    from the Hugging Face Hub. Any other name is a local `.csv`, `.tsv`, `.json` or `.jsonl` file (one
    split, returned for any `split` value), a folder that contains `{split}.<extension>` files, or a hub
    dataset name. Columns are found by common names (`sentence`, `sentence2`, `endings`, ...) unless a
    mapping argument names them. A dataset is multiple choice when it has a choices column.

    Args:
        name_or_path (`str`):
            `sst2`, `dream`, a file or folder path, or a hub dataset name.
        split (`str`):
            `train`, `dev` or `validation` (the same split), or `test` on the hub.
        data_dir (`str` or `os.PathLike`, *optional*):
            Folder with local copies of the built-in datasets; see [`resolve_data_dir`].
        limit (`int`, *optional*):
            Keep a seeded random sample of this many examples (questions, for multiple choice), in the
            original order. Example ids are assigned before sampling, so they do not depend on `limit`.
        seed (`int`, *optional*, defaults to 0):
            Seed of the `limit` sample.
        text_column (`str`, *optional*):
            Source column of the standard `text` column, for a dataset whose names are not recognized.
        text_pair_column (`str`, *optional*):
            Source column of `text_pair`, the second text of a sentence-pair task.
        label_column (`str`, *optional*):
            Source column of `label`.
        question_column (`str`, *optional*):
            Source column of `question` (multiple choice).
        choices_column (`str`, *optional*):
            Source column of `choices`, a list of strings (multiple choice).
        context_column (`str`, *optional*):
            Source column of `context`, the passage or dialogue (multiple choice).

    Returns:
        `datasets.Dataset`: the split with the standard columns only.

    Raises:
        `FileNotFoundError`: a local data file or folder is missing.
        `ValueError`: an unknown split, a missing column, a label that is not an integer class id, or
            a multiple-choice label that matches no choice.
    """
    key = name_or_path.strip().lower().replace("-", "")
    if key in ("sst2", "dream"):
        folder = resolve_data_dir(data_dir)
        source = f"{name_or_path} ({'local files in ' + str(folder) if folder else 'Hugging Face Hub'})"
        if key == "sst2":
            dataset = _load_sst2(split, folder)
            dataset = dataset.select_columns(["example_id", "text", "label"])
        else:
            dataset = _load_dream(split, folder)
    else:
        source = name_or_path
        raw = _load_other(name_or_path, split)
        choices = _pick_column(raw, choices_column, _CHOICES_COLUMNS, "choices_column", source, required=False)
        label = _pick_column(raw, label_column, _LABEL_COLUMNS, "label_column", source, required=True)
        if choices is not None:
            dataset = _standardize_multiple_choice(
                raw, source, choices_column=choices, label_column=label,
                context_column=_pick_column(raw, context_column, _CONTEXT_COLUMNS, "context_column", source,
                                            required=False),
                question_column=_pick_column(raw, question_column, _QUESTION_COLUMNS, "question_column", source,
                                             required=False),
            )
        else:
            dataset = _standardize_classification(
                raw, source,
                text_column=_pick_column(raw, text_column, _TEXT_COLUMNS, "text_column", source, required=True),
                text_pair_column=_pick_column(raw, text_pair_column, _TEXT_PAIR_COLUMNS, "text_pair_column",
                                              source, required=False),
                label_column=label,
            )

    if task_kind(dataset) == CLASSIFICATION:
        _check_class_labels(dataset, source, split)
    return _take_subset(dataset, limit, seed)


def task_kind(dataset: datasets.Dataset) -> TaskKind:
    """Return `"multiple-choice"` for a dataset with a `choices` column and `"classification"` for one with `text`.

    Raises:
        `ValueError`: the dataset has neither column, so it did not come from [`load_task_dataset`].
    """
    if "choices" in dataset.column_names:
        return MULTIPLE_CHOICE
    if "text" in dataset.column_names:
        return CLASSIFICATION
    raise ValueError(
        f"Cannot tell the task of a dataset with columns {dataset.column_names}: it needs a `text` column "
        f"(classification) or a `choices` column (multiple choice). Load it with load_task_dataset."
    )


def num_labels_of(dataset: datasets.Dataset) -> int:
    """Return the number of classes (classification) or of choices per question (multiple choice).

    For classification this is the size of the `ClassLabel` set that [`load_task_dataset`] attaches, so a
    subset that happens to lack a class still reports every class.
    """
    if task_kind(dataset) == MULTIPLE_CHOICE:
        return len(dataset[0]["choices"]) if len(dataset) else 0
    feature = dataset.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return max(_values(dataset, "label")) + 1 if len(dataset) else 0


def label_names_of(dataset: datasets.Dataset) -> list[str] | None:
    """Return the class names of a classification dataset, or `None` for multiple choice."""
    if task_kind(dataset) == MULTIPLE_CHOICE:
        return None
    feature = dataset.features["label"]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _empty_example_ids(dataset: datasets.Dataset, kind: TaskKind) -> list[str]:
    empty = []
    if kind == CLASSIFICATION:
        # A missing second text (None) is allowed, but an empty first text or an empty second text is not.
        pairs = _values(dataset, "text_pair") if "text_pair" in dataset.column_names else [None] * len(dataset)
        for example_id, text, pair in zip(_values(dataset, "example_id"), _values(dataset, "text"), pairs):
            if _is_empty(text) or (pair is not None and _is_empty(pair)):
                empty.append(example_id)
    else:
        for example_id, context, question, choices in zip(
            _values(dataset, "example_id"), _values(dataset, "context"), _values(dataset, "question"),
            _values(dataset, "choices"),
        ):
            if (_is_empty(context) and _is_empty(question)) or any(_is_empty(choice) for choice in choices):
                empty.append(example_id)
    return empty


def _tokenize_classification(batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
    texts = batch["text"]
    pairs = batch.get("text_pair") or [None] * len(texts)
    single_rows = [row for row, pair in enumerate(pairs) if pair is None]
    pair_rows = [row for row, pair in enumerate(pairs) if pair is not None]

    encoded: dict[str, list] = {}
    truncated = [False] * len(texts)
    for rows in (single_rows, pair_rows):
        if not rows:
            continue
        first = [texts[row] for row in rows]
        second = [pairs[row] for row in rows] if rows is pair_rows else None
        full = tokenizer(first, second, truncation=False, verbose=False)
        part = tokenizer(first, second, truncation=True, max_length=max_length)
        for position, row in enumerate(rows):
            truncated[row] = len(full["input_ids"][position]) > max_length
        for key, values in part.items():
            column = encoded.setdefault(key, [None] * len(texts))
            for position, row in enumerate(rows):
                column[row] = values[position]
    encoded["truncated"] = truncated
    return encoded


def _tokenize_pairs(tokenizer, firsts: list[str], seconds: list[str], strategy: str, max_length: int):
    # "only_first" cuts the first segment from the left, so that the question at its end and the latest
    # context survive and the earliest context tokens go. "longest_first" keeps the tokenizer's own side.
    if strategy != "only_first":
        return tokenizer(firsts, seconds, truncation=strategy, max_length=max_length)
    previous_side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(firsts, seconds, truncation=strategy, max_length=max_length)
    finally:
        tokenizer.truncation_side = previous_side


def _tokenize_multiple_choice(batch: dict[str, list], tokenizer, max_length: int,
                              fallback_counter: list[int]) -> dict[str, list]:
    # Flatten [B, C] (question, choice) pairs into B * C pairs. The first segment is the context and
    # the question, which is what gets truncated, and the second is the choice.
    num_choices = len(batch["choices"][0])
    firsts, seconds = [], []
    for context, question, choices in zip(batch["context"], batch["question"], batch["choices"]):
        first = "\n".join(part for part in (context, question) if part)
        for choice in choices:
            firsts.append(first)
            seconds.append(choice)

    full_lengths = [len(ids) for ids in tokenizer(firsts, seconds, truncation=False, verbose=False)["input_ids"]]
    choice_lengths = [len(ids) for ids in tokenizer(seconds, add_special_tokens=False, verbose=False)["input_ids"]]
    num_special = tokenizer.num_special_tokens_to_add(pair=True)

    # "only_first" fails when even an empty first segment leaves the pair too long. Such pairs are
    # truncated with "longest_first", which also shortens the choice, and they are counted.
    only_first_rows, longest_first_rows = [], []
    for index, (total, choice_length) in enumerate(zip(full_lengths, choice_lengths)):
        if total > max_length and choice_length + num_special + 1 > max_length:
            longest_first_rows.append(index)
        else:
            only_first_rows.append(index)
    fallback_counter[0] += len(longest_first_rows)

    flat: dict[str, list] = {}
    for rows, strategy in ((only_first_rows, "only_first"), (longest_first_rows, "longest_first")):
        if not rows:
            continue
        part = _tokenize_pairs(tokenizer, [firsts[i] for i in rows], [seconds[i] for i in rows], strategy,
                               max_length)
        for key, values in part.items():
            column = flat.setdefault(key, [None] * len(firsts))
            for position, index in enumerate(rows):
                column[index] = values[position]

    # Regroup into one [C, S_row] list per question (S_row varies until the collator pads).
    encoded = {
        key: [values[start:start + num_choices] for start in range(0, len(values), num_choices)]
        for key, values in flat.items()
    }
    encoded["truncated"] = [
        any(length > max_length for length in full_lengths[start:start + num_choices])
        for start in range(0, len(full_lengths), num_choices)
    ]
    return encoded


def encode_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int = 128,
    drop_empty: bool = False,
) -> datasets.Dataset:
    """Tokenize a dataset from [`load_task_dataset`] for a model, without padding.

    Classification rows get `input_ids` of shape `[S]` (text, and `text_pair` when present, truncated
    with `longest_first`). Multiple-choice rows get `input_ids` of shape `[C, S]`: one sequence per
    choice, whose first segment is `context + "\\n" + question` and whose second segment is the choice.
    Only the first segment is truncated (`only_first`), from the left, so the earliest context tokens are
    dropped and the question is kept. A pair whose choice alone does not fit is truncated with
    `longest_first` on the tokenizer's own truncation side instead, and the number of such pairs is logged. `S` differs between rows until
    a collator pads them.

    Truncation is recorded per row in a boolean `truncated` column, so the count survives subsetting
    and sharding (`sum(encoded["truncated"][:])`). The count is also logged at INFO level.

    Args:
        dataset (`datasets.Dataset`):
            A dataset with the standard columns of [`load_task_dataset`].
        tokenizer ([`PreTrainedTokenizerBase`]):
            The tokenizer of the model.
        max_length (`int`, *optional*, defaults to 128):
            Maximum sequence length in tokens, special tokens included.
        drop_empty (`bool`, *optional*, defaults to `False`):
            What to do with rows whose text is empty or whitespace (for multiple choice: an empty choice,
            or both context and question empty). `False` raises an error that lists them, and `True`
            drops them with a warning that gives their count.

    Returns:
        `datasets.Dataset`: the input columns plus `input_ids`, `attention_mask`, `token_type_ids` (when
        the tokenizer returns them) and `truncated`.

    Raises:
        `ValueError`: `max_length` is too small for the tokenizer's special tokens, or rows are empty and
            `drop_empty` is `False`.
    """
    kind = task_kind(dataset)
    min_length = tokenizer.num_special_tokens_to_add(pair=True) + 2
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < min_length:
        raise ValueError(
            f"max_length={max_length!r} is too small: a sequence pair needs at least {min_length} tokens with "
            f"this tokenizer's special tokens. Use a larger max_length, for example 128."
        )
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < max_length:
        logger.warning("max_length=%d exceeds the tokenizer's model_max_length=%d.", max_length, model_max)

    empty_ids = _empty_example_ids(dataset, kind)
    if empty_ids:
        if not drop_empty:
            raise ValueError(
                f"{len(empty_ids)} example(s) have empty text, for example {empty_ids[:5]}. Remove them or "
                f"call encode_dataset(..., drop_empty=True) to drop them."
            )
        logger.warning("Dropping %d example(s) with empty text, for example %s.", len(empty_ids), empty_ids[:5])
        empty = set(empty_ids)
        dataset = dataset.filter(lambda example_id: example_id not in empty, input_columns="example_id")

    fallback_counter = [0]
    if kind == CLASSIFICATION:
        encoded = dataset.map(lambda batch: _tokenize_classification(batch, tokenizer, max_length), batched=True,
                              load_from_cache_file=False, desc="Tokenizing")
    else:
        encoded = dataset.map(
            lambda batch: _tokenize_multiple_choice(batch, tokenizer, max_length, fallback_counter),
            # No cache, because the fallback count is only gathered while the function runs.
            batched=True, load_from_cache_file=False, desc="Tokenizing",
        )
        if fallback_counter[0]:
            logger.warning(
                "%d (question, choice) pair(s) had a choice too long for max_length=%d and were truncated with "
                "'longest_first', which also shortens the choice.", fallback_counter[0], max_length,
            )

    num_truncated = sum(_values(encoded, "truncated"))
    logger.info("Tokenized %d example(s) at max_length=%d; %d were truncated.", len(encoded), max_length,
                num_truncated)
    return encoded
