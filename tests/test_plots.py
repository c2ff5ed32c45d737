"""`attend-robust plot` on small HackAttend runs: files are written and match the runs' data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hackattend_support import flippy_bert, minilm_tokenizer, write_tsv

from attend_robust.cli import main as cli_main
from attend_robust.data import load_task_dataset
from attend_robust.hackattend import HackAttendConfig
from attend_robust.hackattend.evaluator import HackAttendEvaluator
from attend_robust.plots import Run, asr_by_alpha, layer_success_counts, plot_runs

SENTENCES = [
    ("a gripping , funny and moving film", 1), ("dull , lifeless and far too long", 0),
    ("the best thing in the movie is its score", 1), ("a mess of a script with no heart", 0),
    ("warm , clever and beautifully acted", 1), ("i wanted my two hours back", 0),
    ("one of the year 's most charming surprises", 1), ("flat jokes and flatter characters", 0),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tokenizer = minilm_tokenizer()
    root = tmp_path_factory.mktemp("plots")
    model_dir = root / "victim"
    victim = flippy_bert(tokenizer.vocab_size)
    victim.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_file = write_tsv(root / "sentences.tsv", SENTENCES)
    dataset = load_task_dataset(str(data_file), "train")

    run_dirs = []
    for alpha in (0.05, 0.2):
        run_dir = root / f"alpha-{alpha}"
        info = {"model": str(model_dir), "dataset": str(data_file), "split": "train", "limit": None, "limit_seed": 0}
        evaluator = HackAttendEvaluator(flippy_bert(tokenizer.vocab_size), tokenizer, HackAttendConfig(alpha=alpha),
                                        output_dir=run_dir, progress=False, run_info=info)
        evaluator.evaluate(dataset)
        run_dirs.append(run_dir)
    return run_dirs


def test_plot_files_and_data_match_runs(runs, tmp_path):
    result = plot_runs(runs, tmp_path)
    names = {path.split("/")[-1] for path in result["files"]}
    for stem in ("successes_by_layer", "asr_by_alpha", f"{runs[0].name}_successes_by_head"):
        assert f"{stem}.png" in names
        assert f"{stem}.svg" in names
    assert any(name.startswith(f"{runs[0].name}_attention_") for name in names)
    for path in result["files"]:
        assert (tmp_path / path.split("/")[-1]).stat().st_size > 0

    saved = json.loads((tmp_path / "plots.json").read_text())
    for run_dir, plotted in zip(runs, saved["successes_by_layer"]):
        report = json.loads((run_dir / "report.json").read_text())
        assert plotted["counts"] == [report["failures"], *report["successes_by_layer"]]
        assert sum(plotted["fractions"]) == pytest.approx(1.0)
        assert saved["successes_by_head"][run_dir.name] == report["successes_by_head"]

    points = [point for group in saved["asr_by_alpha"].values() for point in group]
    expected = [(json.loads((r / "config.json").read_text())["alpha"],
                 json.loads((r / "report.json").read_text())["attack_success_rate"]) for r in runs]
    assert sorted(map(tuple, points)) == sorted(expected)


def test_runs_of_one_alpha_are_flagged(runs, caplog):
    same = [runs[0], runs[0]]
    with caplog.at_level("WARNING", logger="attend_robust.plots"):
        groups = asr_by_alpha([Run.load(path) for path in same])
    (points,) = groups.values()
    assert len(points) == 2
    assert points[0] == points[1]
    assert f"Runs {runs[0]}, {runs[0]} share alpha" in caplog.text


def test_attention_maps_show_the_mask(runs, tmp_path):
    maps = plot_runs(runs[:1], tmp_path)["data"]["attention"]
    records = [json.loads(line) for line in (runs[0] / "records.jsonl").read_text().splitlines()]
    record = next(r for r in records if r["example_id"] == maps["example_id"])
    assert record["status"] == "success"
    assert [maps["sequence"], maps["layer"], maps["head"]] == record["mask"][-1][:3]
    assert len(maps["tokens"]) == len(maps["clean"]) == len(maps["perturbed"])
    assert maps["masked_units"]
    for query, key in maps["masked_units"]:
        assert maps["perturbed"][query][key] == 0.0
        assert maps["clean"][query][key] > 0.0
    for row in maps["clean"]:
        assert sum(row) == pytest.approx(1.0, abs=1e-5)


def test_plot_command_writes_figures(runs, tmp_path, capsys):
    assert cli_main(["plot", str(runs[1]), "--output-dir", str(tmp_path), "--no-attention"]) == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "successes_by_layer.png") in printed
    assert not any("attention" in path for path in printed)


def test_plot_rejects_unfinished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="report.json not found"):
        Run.load(tmp_path)
    assert layer_success_counts(Run(tmp_path, {}, {"clean_correct": 0, "failures": 0, "successes_by_layer": [0, 0]},
                                    {}))["fractions"] == [0.0, 0.0, 0.0]


def test_attention_maps_of_run_with_column_options(runs, tmp_path):
    """A run on a file whose columns needed --text-column and --label-column can still be plotted."""
    model_dir = runs[0].parent / "victim"
    data_file = tmp_path / "reviews.tsv"
    data_file.write_text("review\tsentiment\n" + "".join(f"{text}\t{label}\n" for text, label in SENTENCES))
    run_dir = tmp_path / "run"
    assert cli_main(["attack", "--model", str(model_dir), "--dataset", str(data_file), "--text-column", "review",
                     "--label-column", "sentiment", "--alpha", "0.2", "--output-dir", str(run_dir),
                     "--no-progress"]) == 0
    run_info = json.loads((run_dir / "run.json").read_text())["run_info"]

    assert run_info["columns"] == {"text_column": "review", "label_column": "sentiment"}
    assert json.loads((run_dir / "report.json").read_text())["successes"] > 0
    maps = plot_runs([run_dir], tmp_path / "plots")["data"]["attention"]
    assert maps["tokens"][0] == "[CLS]"
    assert any(name.startswith("run_attention_") for name in (path.name for path in (tmp_path / "plots").iterdir()))


def test_plot_after_demo_style_run_uses_saved_paths(runs, tmp_path, monkeypatch):
    """A run on `sst2` from a data folder is plotted from another working folder, and a wrong folder is rejected."""
    model_dir = runs[0].parent / "victim"
    for name, rows in (("small", SENTENCES[:6]), ("large", SENTENCES)):
        folder = tmp_path / name / "sst2"
        folder.mkdir(parents=True)
        write_tsv(folder / "dev.tsv", rows)
    run_dir = tmp_path / "run"
    assert cli_main(["attack", "--model", str(model_dir), "--dataset", "sst2", "--split", "dev", "--data-dir",
                     str(tmp_path / "small"), "--alpha", "0.2", "--output-dir", str(run_dir), "--no-progress"]) == 0
    assert json.loads((run_dir / "run.json").read_text())["run_info"]["data_dir"] == str((tmp_path / "small").resolve())

    monkeypatch.chdir(tmp_path / "large")  # no shared data folder here; the saved paths are used
    maps = plot_runs([run_dir], tmp_path / "plots")["data"]["attention"]
    assert maps["tokens"][0] == "[CLS]"
    with pytest.raises(ValueError, match="is not the one attacked"):
        plot_runs([run_dir], tmp_path / "plots-wrong", data_dir=str(tmp_path / "large"))


def test_cli_prints_invalid_input_without_traceback(tmp_path, capsys):
    from attend_robust.cli import run

    assert run(["attack", "--model", str(tmp_path / "missing"), "--dataset", "sst2", "--split", "dev",
                "--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("attend-robust: error: ")
    assert "Traceback" not in error
    assert "ATTEND_ROBUST_TRACEBACK=1" in error


def test_cli_names_missing_model_folder(tmp_path, capsys):
    from attend_robust.cli import run

    examples_data = Path(__file__).resolve().parent.parent / "examples" / "data"
    missing = tmp_path / "missing-model"
    assert run(["attack", "--model", str(missing), "--dataset", "sst2", "--data-dir", str(examples_data),
                "--limit", "2", "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"Model folder '{missing}' not found" in error
    assert "Traceback" not in error


def test_cli_explains_unknown_model_name(tmp_path, capsys, monkeypatch):
    from attend_robust.cli import run

    # "runs/victim" could be a Hub name, so it goes to the Hub, which is offline in the tests.
    monkeypatch.chdir(tmp_path)
    examples_data = Path(__file__).resolve().parent.parent / "examples" / "data"
    assert run(["attack", "--model", "runs/victim", "--dataset", "sst2", "--data-dir", str(examples_data),
                "--limit", "2", "--output-dir", "out"]) == 2
    error = capsys.readouterr().err
    assert f"Model 'runs/victim' is not a local folder ({tmp_path / 'runs' / 'victim'} does not exist)" in error
    assert "Pass a folder that contains config.json" in error
    assert "Traceback" not in error


def test_cli_rejects_model_head_of_other_task(tmp_path, capsys):
    from attend_robust.cli import run

    model_dir = tmp_path / "choice-model"
    flippy_bert(100, multiple_choice=True).save_pretrained(model_dir)
    examples_data = Path(__file__).resolve().parent.parent / "examples" / "data"
    assert run(["attack", "--model", str(model_dir), "--dataset", "sst2", "--data-dir", str(examples_data),
                "--limit", "2", "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "is a BertForMultipleChoice checkpoint" in error
    assert "the dataset is classification" in error
    assert not (tmp_path / "out").exists()


def test_cli_interrupt_prints_one_line(tmp_path, capsys, monkeypatch):
    from attend_robust import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_plot", interrupted)
    assert cli.run(["plot", str(tmp_path)]) == 130
    error = capsys.readouterr().err
    assert error == "attend-robust: interrupted\n"
