"""`HackAttendEvaluator`: HackAttend over a dataset, with resumable JSONL records and Accelerate sharding."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..data import MULTIPLE_CHOICE, encode_dataset, num_labels_of, task_kind
from ..masked_model import AttentionMaskedModel
from .config import HackAttendConfig
from .records import (
    SKIP_EMPTY_INPUT,
    SKIP_LABEL_OUT_OF_RANGE,
    AttackRecord,
    ReplayResult,
    read_records,
    replay,
    write_record,
)
from .report import summarize
from .search import HackAttendSearch

logger = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
PART_FILE_PATTERN = "records.part-*.jsonl"
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
REPORT_FILE = "report.json"

_INPUT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def ids_fingerprint(example_ids: list[str]) -> str:
    """Return the SHA-256 of a dataset's example ids in order; `run.json` stores it to detect another dataset."""
    return hashlib.sha256("\n".join(example_ids).encode("utf-8")).hexdigest()


def default_accelerator() -> Accelerator:
    """Return an `Accelerator` that also forms a multi-process group on a machine without GPU.

    Without `cpu=True`, Accelerate 1.16 ignores `WORLD_SIZE` on a CPU-only machine and every
    launched process would attack every example.
    """
    return Accelerator(cpu=not torch.accelerator.is_available())


def check_launch(accelerator: Accelerator) -> None:
    """Check that every launched process is part of `accelerator`'s process group.

    Raises `RuntimeError` when the launcher started more processes than the group has, because
    processes that each run alone would all attack every example and write the same files. Warns
    when a multi-process launch produced a single process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > accelerator.num_processes:
        raise RuntimeError(
            f"WORLD_SIZE={world_size}, but the Accelerator runs {accelerator.num_processes} process(es), so every "
            "process would attack every example. On a machine without GPU, create it with Accelerator(cpu=True)."
        )
    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ and accelerator.num_processes == 1:
        # `accelerate launch --cpu --num_processes N` (Accelerate 1.16) sets MASTER_ADDR but starts one process.
        logger.warning(
            "Running as a single process although a multi-process launch was requested. `accelerate launch --cpu` "
            "starts one process; use `accelerate launch --multi_gpu --num_processes N` (it runs on CPU when no GPU "
            "is present) or `torchrun --nproc_per_node N`."
        )


class HackAttendEvaluator:
    """Attack every example of a dataset with HackAttend and report how vulnerable the model is.

    Args:
        model (`PreTrainedModel` or `AttentionMaskedModel`): a fine-tuned `...ForSequenceClassification`
            or `...ForMultipleChoice` model of a supported architecture. A model in training mode is
            switched to eval mode with a warning, because dropout would make the search random.
        tokenizer: the model's tokenizer.
        config (`HackAttendConfig`, *optional*): search settings. Default: `HackAttendConfig()`.
        output_dir (`str` or `Path`, *optional*): folder for `config.json`, `run.json`, the records
            (`records.jsonl`) and `report.json`. Records are appended as examples finish, and a run
            restarted with the same folder, settings and dataset attacks only the examples that have
            no record yet. Without it, nothing is written and nothing resumes.
        accelerator (`Accelerator`, *optional*): shards the examples across processes. Default:
            `default_accelerator()`, one process unless started by a multi-process launcher.
        progress (`bool`): show a progress bar on the main process.
        run_info (`dict`, *optional*): JSON-serialisable description of the run (model path, dataset
            name, split) saved in `run.json`; a resumed run must have the same.

    Records do not depend on the number of processes or the batch sizes. Examples searched side by
    side share forward passes but no decision, and random choices are seeded by the config's seed
    and the example id. Between two identical runs only `seconds` (the wall time of the example's
    group divided by its size) and the report's `timing` differ. With another `query_batch_size`,
    `layer_evaluations` also differs, because it counts the work spent. With other batch sizes, the
    two confidence fields may differ in their last float digits, because CPU BLAS results can depend on memory
    alignment and batch shape. Every decision, count of queries and passes, and mask is the same.
    """

    def __init__(
        self,
        model: PreTrainedModel | AttentionMaskedModel,
        tokenizer: Any,
        config: HackAttendConfig | None = None,
        *,
        output_dir: str | os.PathLike | None = None,
        accelerator: Accelerator | None = None,
        progress: bool = True,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        self.wrapped = model if isinstance(model, AttentionMaskedModel) else AttentionMaskedModel(model)
        if self.wrapped.model.training:
            warnings.warn(
                "The model is in training mode; HackAttend evaluates it in eval mode (dropout off) so that "
                "every query is deterministic. Call model.eval() to silence this warning.",
                stacklevel=2,
            )
            self.wrapped.model.eval()
        self.tokenizer = tokenizer
        self.accelerator = accelerator if accelerator is not None else default_accelerator()
        check_launch(self.accelerator)
        self.wrapped.model.to(self.accelerator.device)
        self.config = (config or HackAttendConfig()).resolve(self.wrapped.num_layers, self.wrapped.num_heads)
        self.search = HackAttendSearch(self.wrapped, self.config)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.progress = progress
        self.run_info = dict(run_info or {})
        self.records: list[AttackRecord] = []

    # ------------------------------------------------------------------ checks and encoding

    def _check_task(self, dataset: datasets.Dataset) -> str:
        kind = task_kind(dataset)
        class_name = type(self.wrapped.model).__name__
        if kind == MULTIPLE_CHOICE and not class_name.endswith("ForMultipleChoice"):
            raise ValueError(
                f"The dataset is multiple choice, but the model is a {class_name}. Load it with "
                "AutoModelForMultipleChoice (a model fine-tuned for multiple choice)."
            )
        if kind != MULTIPLE_CHOICE:
            if class_name.endswith("ForMultipleChoice"):
                raise ValueError(
                    f"The dataset is classification, but the model is a {class_name}. Load a model fine-tuned "
                    "for sequence classification with AutoModelForSequenceClassification."
                )
            dataset_labels = num_labels_of(dataset)
            model_labels = int(self.wrapped.config.num_labels)
            if dataset_labels != model_labels:
                raise ValueError(
                    f"The model has num_labels={model_labels}, but the dataset has {dataset_labels} classes. "
                    "Use a model fine-tuned on this dataset's label set."
                )
        return kind

    def _label_in_range(self, kind: str, example: dict[str, Any]) -> bool:
        label = example["label"]
        if isinstance(label, bool) or not isinstance(label, int):
            return False
        limit = len(example["choices"]) if kind == MULTIPLE_CHOICE else int(self.wrapped.config.num_labels)
        return 0 <= label < limit

    def _tensors(self, encoded_row: dict[str, Any], kind: str) -> dict[str, torch.Tensor]:
        """Pad one encoded row into `[1, S]` (or `[1, C, S]`) tensors."""
        columns = [name for name in _INPUT_COLUMNS if name in encoded_row]
        if kind == MULTIPLE_CHOICE:
            sequences = [
                {name: encoded_row[name][choice] for name in columns}
                for choice in range(len(encoded_row["input_ids"]))
            ]
            padded = self.tokenizer.pad(sequences, return_tensors="pt")
            return {name: padded[name].unsqueeze(0) for name in columns}
        padded = self.tokenizer.pad([{name: encoded_row[name] for name in columns}], return_tensors="pt")
        return {name: padded[name] for name in columns}

    def encode(self, dataset: datasets.Dataset) -> tuple[datasets.Dataset, dict[str, int]]:
        """Tokenize `dataset` as the attack does, and return the encoded rows and each example id's row.

        Examples with empty text are missing from the encoded rows (their records are skipped as
        `empty-input`).
        """
        encoded = encode_dataset(dataset, self.tokenizer, max_length=self.config.max_length, drop_empty=True)
        return encoded, {example_id: row for row, example_id in enumerate(encoded["example_id"])}

    def search_inputs(self, dataset: datasets.Dataset) -> list[tuple[dict[str, torch.Tensor], int, str]]:
        """Encode `dataset` as the attack does and return `(inputs, label, example_id)` per example.

        These are the arguments of `HackAttendSearch.attack` and the items of `attack_many`.
        Examples that `evaluate` would record as skipped (empty text, label outside the model's
        label set) are left out.
        """
        kind = self._check_task(dataset)
        encoded, rows = self.encode(dataset)
        items = []
        for position in range(len(dataset)):
            prepared = self._prepare(dataset[position], position, kind, encoded, rows)
            if isinstance(prepared, _Searchable):
                items.append((prepared.inputs, prepared.label, prepared.example_id))
        return items

    def replay(self, record: AttackRecord, dataset: datasets.Dataset) -> ReplayResult:
        """Reapply `record`'s mask to its example in `dataset` and return the model's prediction."""
        position = list(dataset["example_id"]).index(record.example_id)
        encoded, rows = self.encode(dataset.select([position]))
        inputs = self._tensors(encoded[rows[record.example_id]], task_kind(dataset))
        return replay(record, self.wrapped, inputs)

    # ------------------------------------------------------------------ output folder

    def _check_output_dir(self, fingerprint: str, num_examples: int) -> None:
        """Raise when the output folder contains a run with other settings or another dataset."""
        assert self.output_dir is not None
        config_path = self.output_dir / CONFIG_FILE
        if config_path.exists():
            saved = HackAttendConfig.load(config_path).decision_fields()
            current = self.config.decision_fields()
            differences = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
            if differences:
                details = ", ".join(f"{key}: saved {old!r}, now {new!r}" for key, (old, new) in differences.items())
                raise ValueError(
                    f"{self.output_dir} contains records of a run with other settings ({details}). Use another "
                    "output folder, or the saved settings to resume that run."
                )
        run_path = self.output_dir / RUN_FILE
        if run_path.exists():
            saved_run = json.loads(run_path.read_text(encoding="utf-8"))
            if saved_run.get("dataset_fingerprint") != fingerprint:
                raise ValueError(
                    f"{self.output_dir} contains records of a different dataset (saved: {saved_run.get('num_examples')} "
                    f"examples, now: {num_examples}, or other example ids). Use another output folder."
                )
            for key, value in self.run_info.items():
                if key in saved_run.get("run_info", {}) and saved_run["run_info"][key] != value:
                    raise ValueError(
                        f"{self.output_dir} contains records of a run with {key}={saved_run['run_info'][key]!r}, "
                        f"but this run has {key}={value!r}. Use another output folder."
                    )

    def _record_files(self) -> list[Path]:
        assert self.output_dir is not None
        return [self.output_dir / RECORDS_FILE, *sorted(self.output_dir.glob(PART_FILE_PATTERN))]

    def _read_all_records(self, *, repair: bool = False) -> list[AttackRecord]:
        """Read every records file, keeping one record per example id."""
        by_id: dict[str, AttackRecord] = {}
        for path in self._record_files():
            for record in read_records(path, repair=repair):
                by_id.setdefault(record.example_id, record)
        return sorted(by_id.values(), key=lambda record: record.index)

    def _merge_record_files(self) -> list[AttackRecord]:
        """Write every record, sorted by dataset position, to `records.jsonl` and remove the part files."""
        assert self.output_dir is not None
        records = self._read_all_records()
        target = self.output_dir / RECORDS_FILE
        staging = target.with_suffix(".jsonl.tmp")
        with staging.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(record.to_json() + "\n")
        staging.replace(target)
        for part in self.output_dir.glob(PART_FILE_PATTERN):
            part.unlink()
        return records

    # ------------------------------------------------------------------ evaluate

    def evaluate(self, dataset: datasets.Dataset) -> dict[str, Any]:
        """Attack every example of `dataset` and return the report (see `report.summarize`).

        `dataset` has the standard columns of `attend_robust.data.load_task_dataset`. Examples with
        empty text, and examples whose label is outside the model's label set, are recorded as
        skipped with a reason. Inputs longer than `config.max_length` are truncated and counted.
        """
        kind = self._check_task(dataset)
        example_ids = [str(value) for value in dataset["example_id"]]
        if len(set(example_ids)) != len(example_ids):
            raise ValueError("The dataset's example_id values repeat. Every example needs a unique id so that a run can resume.")
        fingerprint = ids_fingerprint(example_ids)
        accelerator = self.accelerator

        done: set[str] = set()
        if self.output_dir is not None:
            self._check_output_dir(fingerprint, len(example_ids))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                self._prepare_output_dir(fingerprint, len(example_ids))
            accelerator.wait_for_everyone()
            known = set(example_ids)
            for record in self._read_all_records():
                if record.example_id not in known:
                    raise ValueError(
                        f"{self.output_dir} contains a record for example {record.example_id!r}, which is not in "
                        "this dataset. Use another output folder."
                    )
                done.add(record.example_id)

        pending = [position for position, example_id in enumerate(example_ids) if example_id not in done]
        # Round-robin shards: process r takes pending[r], pending[r + P], and so on. A process may get none.
        mine = pending[accelerator.process_index :: accelerator.num_processes]
        if accelerator.is_main_process and done:
            logger.info("Resuming: %d of %d examples already have records.", len(done), len(example_ids))

        encoded, rows = self.encode(dataset.select(mine)) if mine else (None, {})
        try:
            new_records = self._attack_positions(dataset, kind, mine, encoded, rows)
        except KeyboardInterrupt:
            if self.output_dir is not None and accelerator.is_main_process:
                logger.warning(
                    "Interrupted: %d of %d examples have records in %s. Run again with the same output folder to "
                    "resume.", len(self._read_all_records()), len(example_ids), self.output_dir,
                )
            raise

        if self.output_dir is None:
            gathered = gather_object([record.to_json() for record in new_records])
            self.records = sorted((AttackRecord.from_json(line) for line in gathered), key=lambda r: r.index)
        else:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                self._merge_record_files()
            accelerator.wait_for_everyone()
            self.records = read_records(self.output_dir / RECORDS_FILE)

        report = self.build_report(self.records)
        if self.output_dir is not None and accelerator.is_main_process:
            (self.output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        accelerator.wait_for_everyone()
        return report

    def build_report(self, records: list[AttackRecord]) -> dict[str, Any]:
        report = summarize(records, self.wrapped.num_layers, self.wrapped.num_heads)
        report["num_layers"] = self.wrapped.num_layers
        report["num_heads"] = self.wrapped.num_heads
        report["config"] = self.config.to_dict()
        report["run_info"] = self.run_info
        return report

    def _prepare_output_dir(self, fingerprint: str, num_examples: int) -> None:
        assert self.output_dir is not None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.config.save(self.output_dir / CONFIG_FILE)
        run = {"dataset_fingerprint": fingerprint, "num_examples": num_examples, "run_info": self.run_info}
        (self.output_dir / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        # Cut lines that a killed run left half written, so that appends start on a fresh line.
        self._read_all_records(repair=True)

    def _attack_positions(
        self,
        dataset: datasets.Dataset,
        kind: str,
        positions: list[int],
        encoded: datasets.Dataset | None,
        rows: dict[str, int],
    ) -> list[AttackRecord]:
        accelerator = self.accelerator
        handle = None
        if self.output_dir is not None and positions:
            part = self.output_dir / f"records.part-{accelerator.process_index}.jsonl"
            handle = part.open("a", encoding="utf-8")
        bar = tqdm(
            total=len(positions),
            desc=f"HackAttend (process {accelerator.process_index + 1}/{accelerator.num_processes})",
            unit="example",
            disable=not (self.progress and accelerator.is_local_main_process),
            dynamic_ncols=True,
        )
        records: list[AttackRecord] = []
        counts = {"attacked": 0, "successes": 0}

        def emit(record: AttackRecord) -> None:
            records.append(record)
            if handle is not None:
                write_record(handle, record)
            counts["attacked"] += record.attacked
            counts["successes"] += record.success
            bar.update(1)
            rate = f"{100 * counts['successes'] / counts['attacked']:.1f}%" if counts["attacked"] else "n/a"
            bar.set_postfix(asr=rate, refresh=False)

        try:
            searchable = []
            for position in positions:
                prepared = self._prepare(dataset[position], position, kind, encoded, rows)
                if isinstance(prepared, AttackRecord):
                    emit(prepared)
                else:
                    searchable.append(prepared)
            # Examples of one input shape share forward passes, so they are searched side by side.
            searchable.sort(key=lambda item: (item.shape, item.position))
            size = self.config.example_batch_size
            start = 0
            while start < len(searchable):
                end = start + 1
                while end < len(searchable) and end - start < size and searchable[end].shape == searchable[start].shape:
                    end += 1
                chunk = searchable[start:end]
                results = self.search.attack_many([(item.inputs, item.label, item.example_id) for item in chunk])
                for item, result in zip(chunk, results):
                    emit(AttackRecord.from_search(
                        result, example_id=item.example_id, index=item.position, label=item.label,
                        num_tokens=item.num_tokens, truncated=item.truncated,
                    ))
                start = end
        finally:
            bar.close()
            if handle is not None:
                handle.close()
        return records

    def _prepare(
        self,
        example: dict[str, Any],
        position: int,
        kind: str,
        encoded: datasets.Dataset | None,
        rows: dict[str, int],
    ) -> "AttackRecord | _Searchable":
        """Return the skipped record of an example that cannot be attacked, or its search inputs."""
        example_id = str(example["example_id"])
        label = example["label"]
        if example_id not in rows:
            return AttackRecord.skipped(example_id=example_id, index=position, label=label, reason=SKIP_EMPTY_INPUT)
        assert encoded is not None
        encoded_row = encoded[rows[example_id]]
        inputs = self._tensors(encoded_row, kind)
        num_tokens = inputs["attention_mask"].reshape(-1, inputs["attention_mask"].shape[-1]).sum(dim=-1).tolist()
        if not self._label_in_range(kind, example):
            logger.warning("Skipping example %s: label %r is outside the model's label set.", example_id, label)
            return AttackRecord.skipped(
                example_id=example_id, index=position, label=label, reason=SKIP_LABEL_OUT_OF_RANGE,
                num_tokens=num_tokens,
            )
        return _Searchable(
            example_id=example_id, position=position, label=int(label), inputs=inputs, num_tokens=num_tokens,
            truncated=bool(encoded_row["truncated"]),
        )


@dataclass
class _Searchable:
    """An example ready for the search."""

    example_id: str
    position: int
    label: int
    inputs: dict[str, torch.Tensor]
    num_tokens: list[int]
    truncated: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.inputs["input_ids"].shape)
