"""The `attend-robust` command line: `attack` runs HackAttend, `finetune` trains a model, `plot` draws runs."""

from __future__ import annotations

import argparse
import os
import sys

TRACEBACK_ENV = "ATTEND_ROBUST_TRACEBACK"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attend-robust",
        description="Attack self-attention with HackAttend and train robust models with S-Attend.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Each subcommand module registers its parser and sets `func` to the function that runs it.
    from .hackattend.command import add_attack_command
    from .training import add_finetune_command

    add_attack_command(subparsers)
    add_finetune_command(subparsers)
    add_plot_command(subparsers)
    return parser


def add_plot_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    plot = subparsers.add_parser(
        "plot",
        help="Draw the figures of finished HackAttend runs as PNG and SVG files.",
        description=(
            "Draw successes by layer (failures at -1), a layers x heads heatmap of successes, the attention "
            "map of one successful example before and after its perturbation, and, for several runs, ASR "
            "against alpha. The plotted numbers are saved as plots.json beside the figures."
        ),
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Output folder of `attend-robust attack`.")
    plot.add_argument("--output-dir", default=None, help="Folder for the figures. Default: RUN_DIR/plots.")
    plot.add_argument("--example-id", default=None,
                      help="Example whose attention maps are drawn. Default: the first successful example.")
    plot.add_argument("--data-dir", default=None,
                      help="Folder with sst2/ and dream/ for the attention maps (as for `attack`).")
    plot.add_argument("--no-attention", dest="attention", action="store_false",
                      help="Skip the attention maps, which load the model and the dataset.")
    plot.set_defaults(func=run_plot)
    return plot


def run_plot(args: argparse.Namespace) -> int:
    from .plots import plot_runs

    result = plot_runs(
        args.run_dirs, args.output_dir, example_id=args.example_id, attention=args.attention, data_dir=args.data_dir
    )
    for path in result["files"]:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the subcommand; errors propagate as exceptions."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def run(argv: list[str] | None = None) -> int:
    """Run the command for the console script: invalid input prints one error line, not a traceback.

    `ValueError`, `FileNotFoundError` and `TypeError` are what the package raises for invalid
    arguments, data and models, and `ConnectionError` what `datasets` and `huggingface_hub` raise
    when a name is not found locally and the Hub cannot be reached. Ctrl-C prints one line and
    returns 130. Before that, `attack` logs how many examples have records, and a rerun resumes
    from them.
    Set the environment variable `ATTEND_ROBUST_TRACEBACK=1` to see the traceback instead. Every
    other exception keeps its traceback.
    """
    finished = False
    try:
        status = main(argv)
        finished = True
        return status
    except (ValueError, FileNotFoundError, TypeError, ConnectionError) as error:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"attend-robust: error: {error}", file=sys.stderr)
        print(f"(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print("attend-robust: interrupted", file=sys.stderr)
        return 130  # the shell's status for a command stopped by SIGINT
    finally:
        _destroy_process_group(wait_for_others=finished)


def _destroy_process_group(wait_for_others: bool) -> None:
    """Destroy the process group that a run under `accelerate launch` created, if there is one.

    A process that exits while another still works in the group can abort at interpreter exit
    ("terminate called without an active exception"), and the launcher then reports a finished
    run as failed. After a successful run every process waits for the others first. After an
    error it does not, because the others may never reach the barrier.
    """
    distributed = sys.modules.get("torch.distributed")  # not loaded: no group to destroy
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return
    if wait_for_others:
        distributed.barrier()
    distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run())
