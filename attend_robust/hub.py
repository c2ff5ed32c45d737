"""Model cards and Hub uploads for checkpoints trained with S-Attend and attacked with HackAttend.

A card written here states the S-Attend settings, read from the `"sattend"` key of config.json.
When a HackAttend report is given, the card also lists its clean accuracy, robust accuracy, attack
success rate and mean queries in the `model-index` metadata, which `huggingface_hub` parses into
`EvalResult`s.
Every card is parsed again with `huggingface_hub.ModelCard` after writing, so a card that the
library cannot read is never saved silently. The Hub's own server-side check (`ModelCard.validate`)
needs network access and runs only when the folder is uploaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from ._version import __version__
from .models import MINILM_HUB_NAME, packaged_minilm_path

CARD_NAME = "README.md"
# Key of the S-Attend settings in config.json, as `SAttendTrainer` writes it.
SATTEND_CONFIG_KEY = "sattend"
LIBRARY_TAG = "attend-robust"
SATTEND_TAG = "s-attend"
HACKATTEND_TAG = "hackattend"
# Patterns that `Trainer.push_to_hub` excludes from an upload (transformers 5.25): private files and checkpoints.
PUSH_IGNORE_PATTERNS: tuple[str, ...] = ("_*", "checkpoint-*")
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)

# Hub ids of the datasets that attend-robust loads by name: (dataset id, config, display name).
_KNOWN_DATASETS: dict[str, tuple[str, str | None, str]] = {
    "sst2": ("nyu-mll/glue", "sst2", "GLUE SST-2"),
    "dream": ("dataset-org/dream", None, "DREAM"),
}
_HUB_SPLIT_NAMES = {"dev": "validation"}
# Examples in the local splits of the built-in datasets (GLUE SST-2, and DREAM questions), to tell
# a whole split from a sample of it.
_SPLIT_SIZES: dict[tuple[str, str], int] = {
    ("sst2", "train"): 67349,
    ("sst2", "validation"): 872,
    ("dream", "train"): 6116,
    ("dream", "validation"): 2040,
}
_TASK_NAMES = {"text-classification": "Text Classification", "multiple-choice": "Multiple Choice"}
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")

_SATTEND_SECTION = "sattend"
_HACKATTEND_SECTION = "hackattend"


@dataclass(frozen=True)
class HackAttendResult:
    """The figures of one HackAttend report that a model card publishes.

    Accuracies and the attack success rate are fractions in [0, 1], as HackAttend reports them.
    """

    clean_accuracy: float
    robust_accuracy: float
    attack_success_rate: float
    alpha: float
    max_layers: int
    max_heads: int
    dataset: str
    split: str
    mean_queries: float | None = None
    evaluated: int | None = None
    examples: int | None = None  # examples in the attacked data, skipped ones included

    @classmethod
    def from_report(cls, report: str | Path | Mapping[str, Any]) -> "HackAttendResult":
        """Read a HackAttend `report.json` (a path, or its parsed contents).

        Each field is looked up at the top level of the report, then under `config` (alpha, scale)
        and `run_info` (dataset, split), which is where `attend-robust attack` writes them.
        A scale left as None (all layers or heads) is read from `num_layers` and `num_heads`.
        """
        if isinstance(report, (str, Path)):
            path = Path(report)
            try:
                report = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise FileNotFoundError(f"HackAttend report {path} not found.") from None
            except json.JSONDecodeError as error:
                raise ValueError(f"HackAttend report {path} is not valid JSON: {error}.") from None
        if not isinstance(report, Mapping):
            raise TypeError(f"A HackAttend report must be a JSON object, got {type(report).__name__}.")

        sections = [report, report.get("config") or {}, report.get("run_info") or {}]

        def lookup(name: str, fallback: str | None = None) -> Any:
            for section in sections:
                if section.get(name) is not None:
                    return section[name]
            return report.get(fallback) if fallback is not None else None

        values = {
            "clean_accuracy": lookup("clean_accuracy"),
            "robust_accuracy": lookup("robust_accuracy"),
            "attack_success_rate": lookup("attack_success_rate"),
            "alpha": lookup("alpha"),
            "max_layers": lookup("max_layers", fallback="num_layers"),
            "max_heads": lookup("max_heads", fallback="num_heads"),
            "dataset": lookup("dataset"),
            "split": lookup("split"),
        }
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise ValueError(
                f"The HackAttend report lacks {', '.join(missing)}. Pass the report.json that `attend-robust "
                "attack` writes, or a dict with these fields."
            )
        for name in ("clean_accuracy", "robust_accuracy", "attack_success_rate"):
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"HackAttend report field {name} must be a fraction in [0, 1], got {value!r}.")
        return cls(
            clean_accuracy=float(values["clean_accuracy"]),
            robust_accuracy=float(values["robust_accuracy"]),
            attack_success_rate=float(values["attack_success_rate"]),
            alpha=float(values["alpha"]),
            max_layers=int(values["max_layers"]),
            max_heads=int(values["max_heads"]),
            dataset=str(values["dataset"]),
            split=str(values["split"]),
            mean_queries=None if report.get("mean_queries") is None else float(report["mean_queries"]),
            evaluated=None if report.get("evaluated") is None else int(report["evaluated"]),
            examples=None if report.get("examples") is None else int(report["examples"]),
        )

    @property
    def hub_split(self) -> str:
        """Split name as the Hub spells it (`validation` for `dev`)."""
        return _HUB_SPLIT_NAMES.get(self.split, self.split)

    @property
    def split_size(self) -> int | None:
        """Number of examples in the whole split of a built-in dataset, or None when it is not known."""
        return _SPLIT_SIZES.get((self.dataset.lower(), self.hub_split))

    @property
    def is_sample(self) -> bool:
        """Whether the attack covered fewer examples than the whole split of a built-in dataset."""
        return self.examples is not None and self.split_size is not None and self.examples < self.split_size

    @property
    def attack_settings(self) -> dict[str, Any]:
        return {"attack": "HackAttend", "alpha": self.alpha, "max_layers": self.max_layers, "max_heads": self.max_heads}

    def eval_results(self, task_type: str = "text-classification") -> list[EvalResult]:
        """Return the results as `EvalResult`s: clean accuracy, robust accuracy, ASR and, if known, mean queries."""
        dataset_id, dataset_config, dataset_name = _dataset_identity(self.dataset)
        split, dataset_args = self.hub_split, None
        if self.is_sample:
            # The Hub identifies a result by task, dataset, config and split, so a result on part of a
            # split needs a split name of its own, or it would read as a result on the whole split.
            split = f"{self.hub_split} (sample of {self.examples})"
            dataset_args = {"num_examples": self.examples, "split_size": self.split_size}
        common = dict(
            task_type=task_type,
            task_name=_TASK_NAMES.get(task_type),
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_config=dataset_config,
            dataset_split=split,
            dataset_args=dataset_args,
        )
        scale = f"HackAttend, alpha {self.alpha:g}, {self.max_layers} layers x {self.max_heads} heads"
        results = [
            EvalResult(
                **common, metric_type="accuracy", metric_value=self.clean_accuracy, metric_name="Clean accuracy"
            ),
            EvalResult(
                **common,
                metric_type="robust_accuracy",
                metric_value=self.robust_accuracy,
                metric_name=f"Robust accuracy ({scale})",
                metric_args=self.attack_settings,
            ),
            EvalResult(
                **common,
                metric_type="attack_success_rate",
                metric_value=self.attack_success_rate,
                metric_name=f"Attack success rate ({scale})",
                metric_args=self.attack_settings,
            ),
        ]
        if self.mean_queries is not None:
            results.append(
                EvalResult(
                    **common,
                    metric_type="mean_queries",
                    metric_value=self.mean_queries,
                    metric_name=f"Mean queries per attacked example ({scale})",
                    metric_args=self.attack_settings,
                )
            )
        return results


def _dataset_identity(dataset: str) -> tuple[str, str | None, str]:
    known = _KNOWN_DATASETS.get(dataset.lower())
    if known is not None:
        return known
    if _HUB_REPO_ID.match(dataset):
        return dataset, None, dataset
    name = Path(dataset).stem or dataset  # a local file: name it by its stem
    return name, None, name


def read_sattend_settings(folder: str | Path) -> dict[str, Any] | None:
    """Return the `"sattend"` settings stored in `folder/config.json`, or None when there are none."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return None
    settings = json.loads(config_path.read_text(encoding="utf-8")).get(SATTEND_CONFIG_KEY)
    return dict(settings) if settings else None


def hub_model_id(name_or_path: str | None) -> str | None:
    """Return the Hub model id of `name_or_path`, or None for a local folder that is no known copy of a Hub model."""
    if not name_or_path:
        return None
    packaged_minilm = packaged_minilm_path()
    if packaged_minilm is not None and Path(name_or_path).expanduser().resolve() == packaged_minilm.resolve():
        return MINILM_HUB_NAME
    if Path(name_or_path).expanduser().exists() or not _HUB_REPO_ID.match(name_or_path):
        return None
    return name_or_path


def _replace_section(text: str, section: str, body: str | None) -> str:
    """Put `body` between this package's markers for `section`, replacing an earlier version of it."""
    start, end = f"<!-- {LIBRARY_TAG}:{section} -->", f"<!-- /{LIBRARY_TAG}:{section} -->"
    pattern = re.compile(r"\n*" + re.escape(start) + r".*?" + re.escape(end) + r"\n?", flags=re.DOTALL)
    text = pattern.sub("\n", text)
    if body is None:
        return text
    return text.rstrip("\n") + f"\n\n{start}\n{body.strip()}\n{end}\n"


def _correct_trainer_sentence(text: str, base_model: str | list[str] | None) -> str:
    """Fix the opening sentence of `Trainer`'s card when the metadata has what the trainer lacked.

    `Trainer.create_model_card` writes "trained from scratch" when it does not know the base model,
    and "the None dataset" when its dataset has no name.
    """
    text = text.replace(" on the None dataset.", " on an unknown dataset.")
    if isinstance(base_model, str) and base_model:
        text = text.replace(
            "This model was trained from scratch on ",
            f"This model is a fine-tuned version of [{base_model}](https://huggingface.co/{base_model}) on ",
        )
    return text


def _sattend_section(settings: Mapping[str, Any]) -> str:
    layers = settings.get("layers")
    granularity = settings.get("granularity", "unit")
    description = {
        "unit": "each attention unit (one head's query-key cell) of real tokens, except the first token's key "
        "column, was masked with probability alpha, independently per example, layer and head",
        "token": "each real token other than the first and the special tokens was removed as a key with "
        "probability alpha, once per example for every layer and head",
    }.get(granularity, f"granularity {granularity!r}")
    return "\n".join(
        [
            "## S-Attend training",
            "",
            "This model was fine-tuned with S-Attend (Section 7 of \"Unveiling Vulnerability of Self-Attention\", "
            "LREC-COLING 2024), using the attend-robust library: in every training forward pass, "
            + description
            + ". "
            "Evaluation and inference use the plain model, which loads with `AutoModelFor...from_pretrained` "
            "and needs no extra package.",
            "",
            "| setting | value |",
            "|---|---|",
            f"| alpha | {settings.get('alpha')} |",
            f"| granularity | {granularity} |",
            f"| layers | {'all' if layers is None else ', '.join(map(str, layers))} |",
            f"| seed | {settings.get('seed')} |",
            f"| attend-robust version | {settings.get('library_version', 'unknown')} |",
        ]
    )


def _hackattend_section(result: HackAttendResult) -> str:
    queries = "n/a" if result.mean_queries is None else f"{result.mean_queries:.1f}"
    if result.is_sample:
        examples = f"a sample of {result.examples} of the {result.split_size} examples of "
    else:
        examples = "" if result.evaluated is None else f"{result.evaluated} examples of "
    return "\n".join(
        [
            "## Robustness under HackAttend",
            "",
            f"HackAttend masks a fraction alpha = {result.alpha:g} of the units (at least one) of each attention "
            f"matrix it perturbs, and may perturb the top {result.max_layers} layers and {result.max_heads} heads "
            "per layer. "
            f"Measured on {examples}{result.dataset} ({result.split}).",
            "",
            "| clean accuracy | robust accuracy | attack success rate | mean queries |",
            "|---|---|---|---|",
            f"| {100 * result.clean_accuracy:.1f}% | {100 * result.robust_accuracy:.1f}% | "
            f"{100 * result.attack_success_rate:.1f}% | {queries} |",
        ]
    )


def check_model_card(path: str | Path) -> ModelCard:
    """Parse a model card as `huggingface_hub` does and return it; raise `ValueError` when it is invalid.

    This checks the YAML metadata and converts the `model-index` into `EvalResult`s. It is the local
    part of the Hub's validation; the server-side part needs network access.
    """
    path = Path(path)
    card = ModelCard.load(path)  # raises ValueError on invalid YAML or model-index
    if not card.content.startswith("---"):
        raise ValueError(f"Model card {path} has no YAML metadata block.")
    data = card.data.to_dict()
    if "model-index" in data:
        ModelCardData(**data)  # parses the model-index again from the dict form
    return card


def update_model_card(
    folder: str | Path,
    *,
    sattend: Mapping[str, Any] | None = None,
    hackattend_report: str | Path | Mapping[str, Any] | HackAttendResult | None = None,
    task_type: str = "text-classification",
    base_model: str | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """Create or update `folder/README.md` with the S-Attend settings and HackAttend results.

    An existing card (for example the one `Trainer.create_model_card` wrote) keeps its text and
    metadata. The tags `attend-robust`, `s-attend` and `hackattend` are added where they apply.
    `library_name` is set when it is missing, and `base_model` when it is given or found in
    config.json. HackAttend results replace those of an earlier call with the same task, dataset,
    split and metric settings, and this package's sections of the text are rewritten. The card is
    parsed again after saving (see `check_model_card`).

    Args:
        folder (`str` or `Path`): a saved checkpoint folder.
        sattend (`dict`, *optional*): S-Attend settings. Default: the `"sattend"` key of `folder/config.json`.
        hackattend_report (*optional*): a HackAttend `report.json` path, its contents or a `HackAttendResult`.
        task_type (`str`): Hub task id of the results, `"text-classification"` or `"multiple-choice"`.
        base_model (`str`, *optional*): Hub id of the model this one was fine-tuned from. Default: the
            `_name_or_path` in config.json, when the config has one (transformers 5.25 does not write it)
            and it names a Hub model.
        model_name (`str`, *optional*): name of the model in the `model-index`. Default: the existing
            name, else the folder's name.

    Returns:
        The saved `ModelCard`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Checkpoint folder {folder} not found.")
    if sattend is None:
        sattend = read_sattend_settings(folder)
    result = None
    if hackattend_report is not None:
        result = (
            hackattend_report
            if isinstance(hackattend_report, HackAttendResult)
            else HackAttendResult.from_report(hackattend_report)
        )

    card_path = folder / CARD_NAME
    if card_path.is_file():
        card = check_model_card(card_path)
    else:
        card = ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n\n# {model_name or folder.resolve().name}\n")
    data = card.data

    # Metadata: tags, library, base model, results.
    tags = list(data.tags or [])
    for tag, applies in ((LIBRARY_TAG, True), (SATTEND_TAG, bool(sattend)), (HACKATTEND_TAG, result is not None)):
        if applies and tag not in tags:
            tags.append(tag)
    data.tags = tags
    if not data.library_name:
        data.library_name = "transformers"
    if base_model is None and not data.base_model:
        config_path = folder / "config.json"
        if config_path.is_file():
            base_model = hub_model_id(json.loads(config_path.read_text(encoding="utf-8")).get("_name_or_path"))
    if base_model is not None:
        data.base_model = base_model
    if result is not None:
        new_results = result.eval_results(task_type)
        earlier = [
            old for old in (data.eval_results or []) if not any(old.is_equal_except_value(new) for new in new_results)
        ]
        data.eval_results = earlier + new_results
        data.model_name = model_name or data.model_name or folder.resolve().name

    # Text: this package's sections, replaced on every call.
    text = _correct_trainer_sentence(card.text, data.base_model)
    text = _replace_section(text, _SATTEND_SECTION, _sattend_section(sattend) if sattend else None)
    if result is not None:
        text = _replace_section(text, _HACKATTEND_SECTION, _hackattend_section(result))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")
    card.save(card_path)
    return check_model_card(card_path)


def files_to_push(folder: str | Path) -> list[str]:
    """List the files, relative to `folder`, that `push_to_hub` (and `Trainer.push_to_hub`) would upload."""
    folder = Path(folder)
    files = sorted(path.relative_to(folder).as_posix() for path in folder.glob("**/*") if path.is_file())
    ignore = [*PUSH_IGNORE_PATTERNS, *DEFAULT_IGNORE_PATTERNS]
    return list(filter_repo_objects(files, ignore_patterns=ignore))


def missing_push_files(folder: str | Path) -> list[str]:
    """Return what a checkpoint upload of `folder` would lack: config, weights or model card. Empty when complete."""
    files = set(files_to_push(folder))
    missing = []
    is_adapter = "adapter_config.json" in files
    if not is_adapter and "config.json" not in files:
        missing.append("config.json")
    if not files & set(WEIGHT_FILES):
        missing.append("weights (" + " or ".join(WEIGHT_FILES) + ")")
    if CARD_NAME not in files:
        missing.append(CARD_NAME)
    return missing


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    hackattend_report: str | Path | Mapping[str, Any] | HackAttendResult | None = None,
    sattend: Mapping[str, Any] | None = None,
    task_type: str = "text-classification",
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload model trained with S-Attend",
    api: HfApi | None = None,
) -> Any:
    """Write the model card of a saved checkpoint and upload the folder to the Hub, as `Trainer.push_to_hub` does.

    Use it for a checkpoint that was saved earlier, for example after attacking it with HackAttend.
    The repository is created if needed; `checkpoint-*` folders and files starting with `_` are left
    out. Raises `ValueError` naming the missing files when the folder lacks a config, weights or card.

    Returns:
        The `CommitInfo` of the upload.
    """
    update_model_card(folder, sattend=sattend, hackattend_report=hackattend_report, task_type=task_type)
    missing = missing_push_files(folder)
    if missing:
        raise ValueError(f"{folder} is not a complete checkpoint: missing {', '.join(missing)}.")
    api = api if api is not None else HfApi(library_name=LIBRARY_TAG, library_version=__version__)
    repo_url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        token=token,
        revision=revision,
        ignore_patterns=list(PUSH_IGNORE_PATTERNS),
    )
