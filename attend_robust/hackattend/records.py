"""Per-example HackAttend records: JSON round trip, JSONL files and replay of an adversarial mask."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch
from transformers import PreTrainedModel

from ..masked_model import AttentionMaskedModel
from .search import SearchResult, Unit, mask_prediction

logger = logging.getLogger(__name__)

Status = Literal["success", "failure", "misclassified", "skipped"]

# Skip reasons written to `AttackRecord.skip_reason`.
SKIP_EMPTY_INPUT = "empty-input"
SKIP_LABEL_OUT_OF_RANGE = "label-out-of-range"


@dataclass
class AttackRecord:
    """The outcome of HackAttend on one dataset example.

    `status` is `success` (the mask flipped a correct prediction), `failure` (every query kept the
    prediction), `misclassified` (the clean prediction was already wrong, so nothing was attacked)
    or `skipped` (not run, with `skip_reason`). The adversarial mask is `mask`: one entry
    `[sequence, layer, head, [query_0, key_0, query_1, key_1, ...]]` per perturbed attention matrix,
    in the order the search added them.
    """

    example_id: str
    index: int  # position in the dataset
    label: int
    status: Status
    skip_reason: str | None = None
    clean_prediction: int | None = None
    clean_confidence: float | None = None
    queries: int = 0
    model_evaluations: int = 0
    layer_evaluations: int = 0  # attention-layer evaluations spent, prefix reuse and batching included
    perturbed_heads: list[list[int]] = field(default_factory=list)  # [layer, head] in greedy order
    mask: list[list[Any]] = field(default_factory=list)
    num_masked_units: int = 0
    num_perturbed_matrices: int = 0
    candidate_units: int = 0
    hamming: float = 0.0
    ranking_fallbacks: int = 0
    adversarial_prediction: int | None = None
    adversarial_confidence: float | None = None
    num_tokens: list[int] = field(default_factory=list)  # non-padding tokens of each sequence
    truncated: bool = False
    seconds: float = 0.0  # wall time of the search; the only field that differs between identical runs

    @property
    def success(self) -> bool:
        return self.status == "success"

    @property
    def attacked(self) -> bool:
        return self.status in ("success", "failure")

    def units(self) -> list[Unit]:
        """Return the masked units as `(sequence, layer, head, query, key)` tuples."""
        expanded: list[Unit] = []
        for sequence, layer, head, positions in self.mask:
            for offset in range(0, len(positions), 2):
                expanded.append((sequence, layer, head, positions[offset], positions[offset + 1]))
        return expanded

    @classmethod
    def from_search(
        cls,
        result: SearchResult,
        *,
        example_id: str,
        index: int,
        label: int,
        num_tokens: list[int],
        truncated: bool,
    ) -> "AttackRecord":
        if not result.attacked:
            status: Status = "misclassified"
        else:
            status = "success" if result.success else "failure"
        return cls(
            example_id=example_id,
            index=index,
            label=label,
            status=status,
            clean_prediction=result.clean_prediction,
            clean_confidence=result.clean_confidence,
            queries=result.queries,
            model_evaluations=result.model_evaluations,
            layer_evaluations=result.layer_evaluations,
            perturbed_heads=[[layer, head] for layer, head in result.perturbed_heads],
            mask=group_units(result.masked_units),
            num_masked_units=len(result.masked_units),
            num_perturbed_matrices=result.num_perturbed_matrices,
            candidate_units=result.candidate_units,
            hamming=result.hamming,
            ranking_fallbacks=result.ranking_fallbacks,
            adversarial_prediction=result.adversarial_prediction,
            adversarial_confidence=result.adversarial_confidence,
            num_tokens=num_tokens,
            truncated=truncated,
            seconds=result.seconds,
        )

    @classmethod
    def skipped(
        cls, *, example_id: str, index: int, label: int, reason: str, num_tokens: list[int] | None = None
    ) -> "AttackRecord":
        return cls(
            example_id=example_id, index=index, label=label, status="skipped", skip_reason=reason,
            num_tokens=list(num_tokens or []),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "AttackRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    @classmethod
    def from_json(cls, line: str) -> "AttackRecord":
        return cls.from_dict(json.loads(line))


def group_units(units: Iterable[Unit]) -> list[list[Any]]:
    """Group `(sequence, layer, head, query, key)` units per matrix, keeping first-seen order."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for sequence, layer, head, query, key in units:
        groups.setdefault((sequence, layer, head), []).extend((query, key))
    return [[sequence, layer, head, positions] for (sequence, layer, head), positions in groups.items()]


def write_record(handle, record: AttackRecord) -> None:
    """Append one record as a JSON line and flush it to disk, so a killed run loses nothing written."""
    handle.write(record.to_json() + "\n")
    handle.flush()


def read_records(path: str | Path, *, repair: bool = False) -> list[AttackRecord]:
    """Read a JSONL records file.

    A last line without its newline is what a killed run leaves behind: it is dropped with a
    warning and, with `repair=True`, cut from the file so that appends start on a fresh line.
    A malformed line anywhere else raises `ValueError` with the line number.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete, partial = lines[:-1], lines[-1]
    if partial:
        logger.warning("Dropping an incomplete last line of %s (the run was interrupted while writing it).", path)
        if repair:
            path.write_text("".join(line + "\n" for line in complete), encoding="utf-8")
    records: list[AttackRecord] = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            records.append(AttackRecord.from_json(line))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path}, line {number}: not a valid attack record ({error}).") from error
    return records


@dataclass
class ReplayResult:
    """Prediction of the model with a record's mask applied."""

    prediction: int
    probabilities: list[float]
    reproduced: bool  # the prediction equals the record's adversarial prediction


def replay(
    record: AttackRecord,
    model: AttentionMaskedModel | PreTrainedModel,
    inputs: Mapping[str, torch.Tensor],
) -> ReplayResult:
    """Apply `record`'s adversarial mask to the encoded example `inputs` and return the prediction.

    `inputs` must be encoded as the attack encoded them (`HackAttendEvaluator.encode` does this),
    with a leading batch dimension of 1. A plain model is wrapped for the call and unwrapped after.
    """
    if not record.attacked:
        raise ValueError(f"Record {record.example_id!r} has status {record.status!r}; only attacked examples have a mask.")
    if isinstance(model, AttentionMaskedModel):
        prediction, probabilities = mask_prediction(model, inputs, record.units())
    else:
        with AttentionMaskedModel(model) as wrapped:
            prediction, probabilities = mask_prediction(wrapped, inputs, record.units())
    return ReplayResult(
        prediction=prediction,
        probabilities=probabilities.tolist(),
        reproduced=prediction == record.adversarial_prediction,
    )
