"""`HackAttendConfig`: the settings of one HackAttend run, validated on construction and saved as JSON."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

UnitRanking = Literal["gradient", "gradient-largest", "mask-gradient", "score", "random"]
SelectionRanking = Literal["importance", "random"]

UNIT_RANKINGS: tuple[str, ...] = ("gradient", "gradient-largest", "mask-gradient", "score", "random")
SELECTION_RANKINGS: tuple[str, ...] = ("importance", "random")
# Fields that change speed and memory, never a decision.
SPEED_FIELDS: tuple[str, ...] = ("query_batch_size", "example_batch_size", "forward_batch_size")


@dataclass
class HackAttendConfig:
    """Settings of the HackAttend greedy search and of the evaluator that runs it over a dataset.

    `max_layers` and `max_heads` left as `None` mean all of the model's layers and heads (full
    scale). `resolve` fills them in once the model is known, and rejects values larger than the
    model. The batch sizes change speed only. Every other field can change the search's decisions.
    """

    alpha: float = field(
        default=0.01,
        metadata={
            "help": "Fraction of the non-padding units of one attention matrix masked per perturbed head: "
            "k = max(1, floor(alpha * n * n)) for n non-padding tokens. In (0, 1]."
        },
    )
    max_layers: int | None = field(
        default=None,
        metadata={"help": "Number of top-ranked layers the search may perturb (l_max). Default: all layers."},
    )
    max_heads: int | None = field(
        default=None,
        metadata={"help": "Number of top-ranked heads per layer the search may perturb (h_max). Default: all heads."},
    )
    unit_ranking: UnitRanking = field(
        default="gradient",
        metadata={
            "help": "How units inside a head are ranked, L being the cross-entropy of the label: 'gradient' "
            "(dL/dp of the attention probability, most negative first, so masking raises the loss), "
            "'gradient-largest' (dL/dp, largest first, which lowers the loss), 'mask-gradient' (dL/dM of a "
            "continuous keep-mask, most negative first), 'score' (attention probability, largest first) or 'random'."
        },
    )
    layer_ranking: SelectionRanking = field(
        default="importance",
        metadata={
            "help": "How layers are ordered: 'importance' (drop in the predicted class's probability when "
            "the whole layer's attention is removed) or 'random'."
        },
    )
    head_ranking: SelectionRanking = field(
        default="importance",
        metadata={
            "help": "How heads inside a layer are ordered: 'importance' (drop in the predicted class's "
            "probability when the head alone is removed) or 'random'."
        },
    )
    protect_first_token: bool = field(
        default=True,
        metadata={
            "help": "Never mask the key column of the first token ([CLS] or <s>), which includes unit (0, 0), "
            "so the classifier token can always attend to itself."
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the random rankings. Each example's generator is derived from it and the example id."},
    )
    max_length: int = field(
        default=128,
        metadata={"help": "Maximum sequence length in tokens; longer inputs are truncated and counted."},
    )
    query_batch_size: int = field(
        default=16,
        metadata={
            "help": "Most candidate masks of one example evaluated before its next check for a success. Each "
            "example starts with 1 and doubles up to this, so few queries are wasted after an early success "
            "(speed only)."
        },
    )
    example_batch_size: int = field(
        default=16,
        metadata={
            "help": "Number of examples with the same input shape searched together; their removals and queries "
            "share forward passes (speed and memory only)."
        },
    )
    forward_batch_size: int = field(
        default=64,
        metadata={"help": "Most copies of examples, each with its own gates or mask, in one forward pass (speed and memory only)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise TypeError(f"alpha must be a number in (0, 1], got {self.alpha!r}.")
        self.alpha = float(self.alpha)
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1] (a fraction, 0.01 = 1%), got {self.alpha}.")
        for name in ("max_layers", "max_heads"):
            value = getattr(self, name)
            if value is not None:
                _check_positive_int(name, value)
        for name in ("max_length", *SPEED_FIELDS):
            _check_positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}.")
        if self.unit_ranking not in UNIT_RANKINGS:
            raise ValueError(f"unit_ranking must be one of {', '.join(UNIT_RANKINGS)}; got {self.unit_ranking!r}.")
        for name in ("layer_ranking", "head_ranking"):
            value = getattr(self, name)
            if value not in SELECTION_RANKINGS:
                raise ValueError(f"{name} must be one of {', '.join(SELECTION_RANKINGS)}; got {value!r}.")
        if not isinstance(self.protect_first_token, bool):
            raise TypeError(f"protect_first_token must be True or False, got {self.protect_first_token!r}.")

    def resolve(self, num_layers: int, num_heads: int) -> "HackAttendConfig":
        """Return a copy with `max_layers` and `max_heads` filled in for a model of this size.

        Raises `ValueError` when a cap exceeds the model's number of layers or heads.
        """
        for name, value, limit, unit in (
            ("max_layers", self.max_layers, num_layers, "attention layers"),
            ("max_heads", self.max_heads, num_heads, "heads per layer"),
        ):
            if value is not None and value > limit:
                raise ValueError(
                    f"{name}={value} exceeds the model, which has {limit} {unit} "
                    f"({num_layers} layers x {num_heads} heads). Use at most {limit}, or leave it unset for all."
                )
        return dataclasses.replace(
            self,
            max_layers=num_layers if self.max_layers is None else self.max_layers,
            max_heads=num_heads if self.max_heads is None else self.max_heads,
        )

    def decision_fields(self) -> dict[str, Any]:
        """Return the fields that change the search's decisions (all but the batch sizes)."""
        return {key: value for key, value in self.to_dict().items() if key not in SPEED_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HackAttendConfig":
        """Build a config from a dict, dropping with a warning the keys this version does not define."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            warnings.warn(
                f"Ignoring unknown HackAttendConfig keys {unknown}; they may come from a newer attend-robust.",
                stacklevel=2,
            )
        return cls(**{key: value for key, value in values.items() if key in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "HackAttendConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
