"""Prepare a robust checkpoint for the Hugging Face Hub with its model card, and push it with --push.

The script copies the files of CHECKPOINT that a push uploads into --output-dir. As with
`Trainer.push_to_hub`, `checkpoint-*` folders and files starting with `_` are left out. It then
writes the model card there, with the S-Attend settings from config.json and, given --report, the
HackAttend results of that report in the card's `model-index`. Without --push nothing leaves the
machine, so you can read the card and the file list first:

    python examples/push_robust_checkpoint.py --checkpoint runs/examples/sst2/model \
        --report runs/examples/sst2/attack/report.json --repo-id your-name/minilm-sst2-sattend

Then add --push to upload the folder. The upload uses the token of `hf auth login` or $HF_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from attend_robust.hub import files_to_push, missing_push_files, push_to_hub, update_model_card


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Folder of a saved model (save_pretrained output).")
    parser.add_argument("--report", default=None,
                        help="HackAttend report.json measured on this checkpoint. Its results go into the card.")
    parser.add_argument("--repo-id", required=True, help="Hub repository, for example your-name/minilm-sst2-sattend.")
    parser.add_argument("--base-model", default=None,
                        help="Hub id of the model the checkpoint was fine-tuned from, for the card's base_model.")
    parser.add_argument("--output-dir", default=None,
                        help="Folder to prepare for the upload, which must not exist yet (default: CHECKPOINT-hub).")
    parser.add_argument("--push", action="store_true", help="Upload the prepared folder to --repo-id.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    return parser.parse_args(argv)


def task_type_of(checkpoint: Path) -> str:
    """Return the Hub task of a checkpoint from the architecture named in its config.json."""
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    return "multiple-choice" if any("MultipleChoice" in name for name in architectures) else "text-classification"


def prepare_folder(checkpoint: Path, output_dir: Path) -> list[str]:
    """Copy the files of `checkpoint` that a push uploads into `output_dir` and return their names."""
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} already exists. Remove it or pass another --output-dir.")
    files = files_to_push(checkpoint)
    for name in files:
        target = output_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checkpoint / name, target)
    return files


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint / 'config.json'} not found. Pass a folder written by save_pretrained.")
    output_dir = Path(args.output_dir) if args.output_dir else checkpoint.with_name(checkpoint.name + "-hub")

    prepare_folder(checkpoint, output_dir)
    card = update_model_card(
        output_dir, hackattend_report=args.report, task_type=task_type_of(checkpoint),
        base_model=args.base_model, model_name=args.repo_id.split("/")[-1],
    )
    missing = missing_push_files(output_dir)
    if missing:
        raise ValueError(f"{checkpoint} cannot be pushed as a model: it lacks {', '.join(missing)}.")

    print(f"model card: {output_dir / 'README.md'} (tags: {', '.join(card.data.tags or [])})")
    print(f"files for {args.repo_id}:")
    for name in files_to_push(output_dir):
        print(f"  {name}")
    if (output_dir / "finetune_args.json").is_file():
        print(f"note: {output_dir / 'finetune_args.json'} records local paths (model and data folders); "
              "delete it before --push if they should stay private.")

    if args.push:
        commit = push_to_hub(output_dir, args.repo_id, private=args.private or None)
        print(f"pushed to {getattr(commit, 'commit_url', args.repo_id)}")
    else:
        print("Nothing was uploaded. Rerun with --push to upload this folder.")
    return output_dir


if __name__ == "__main__":
    main()
