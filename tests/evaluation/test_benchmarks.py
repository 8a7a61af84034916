"""`python -m visionzip_tune eval`: stock, training-free budgets and the tuned export through lmms-eval, the
paper's percentage table, and lmms-eval failures as one-paragraph errors."""

from __future__ import annotations

import json
import re

import pytest
from conftest import cli_error, lmms_eval_or_skip

from visionzip_tune.__main__ import main as cli
from visionzip_tune.evaluation.benchmarks import TableRow, percent_table
from visionzip_tune.demo.tiny import TinySpec
from visionzip_tune.demo.tiny import save_tiny
from visionzip_tune.errors import UserError
from visionzip_tune.inference.variants import parse_budgets, plan, setting_label

lmms_eval_or_skip()


def test_percent_table_is_each_score_and_the_average_as_a_share_of_stock():
    runs = [
        TableRow("stock", False, None, 576, scores={"gqa": 0.6, "mme": 1800.0, "pope": 0.0}),
        TableRow("VisionZip 54+10", False, {"dominant": 54}, 64, scores={"gqa": 0.45, "mme": 1620.0, "pope": 0.1}),
    ]
    table, rows = percent_table(runs, ["gqa", "mme", "pope"])
    assert rows[0]["percent_of_stock"] == {"gqa": 100.0, "mme": 100.0}  # a zero stock score has no percentage
    assert rows[1]["percent_of_stock"] == pytest.approx({"gqa": 75.0, "mme": 90.0})
    assert rows[1]["average_percent"] == pytest.approx(82.5)
    lines = table.splitlines()
    speed = "req/s | speed-up | prompt tokens | TTFT ms"
    assert lines[0] == f"| run | vision tokens | gqa | mme | pope | Avg. | {speed} |"
    assert (
        lines[3] == "| VisionZip 54+10 | 64 | 0.45 (75.0%) | 1620 (90.0%) | 0.1 (n/a) | 82.5% | n/a | n/a | n/a | n/a |"
    )


def test_budgets_are_d_plus_c_or_totals_split_as_in_the_paper():
    assert parse_budgets("54+10, 128,192") == [
        {"dominant": 54, "contextual": 10},
        {"dominant": 108, "contextual": 20},
        {"dominant": 162, "contextual": 30},
    ]
    assert parse_budgets("0.45+0.05") == [{"dominant_ratio": 0.45, "contextual_ratio": 0.05}]


def test_budgets_name_any_compressor_and_label_it():
    budgets = parse_budgets("divprune:64,pool:16, visionzip:54+10,random:8")
    assert budgets == [
        {"method": "divprune", "tokens": 64},
        {"method": "pool", "tokens": 16},
        {"dominant": 54, "contextual": 10},
        {"method": "random", "tokens": 8},
    ]
    assert [s.label for s in plan(budgets, None)] == ["stock", "divprune:64", "pool:16", "VisionZip 54+10", "random:8"]
    assert setting_label({"method": "random", "tokens": 8, "seed": 3}, tuned=True) == "random:8(seed=3)‡"
    with pytest.raises(UserError, match="'tome:64' is neither DOMINANT"):
        parse_budgets("tome:64")


def test_eval_runs_stock_budgets_and_the_tuned_export(eval_assets, tmp_path, capsys):
    model_dir, export, demo = eval_assets
    out = tmp_path / "eval"
    argv = ["eval", "--projector", str(export), "--budgets", "6+2,3+1", "--held-out", str(demo.eval), "--limit", "6"]
    assert cli([*argv, "--image-folder", str(demo.images), "--output-dir", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    runs = report["runs"]
    assert [r["label"] for r in runs] == ["stock", "VisionZip 6+2", "VisionZip 3+1", "VisionZip‡ 6+2 (tuned)"]
    assert [r["vision_tokens"] for r in runs] == [16, 8, 4, 8]
    assert [r["tuned"] for r in runs] == [False, False, False, True]
    assert runs[0]["budget"] is None and runs[3]["budget"]["dominant"] == 6
    assert report["model"] == str(model_dir) and report["metrics"] == {
        "heldout_gen": "exact_match,none",
        "heldout_mc": "acc,none",
    }
    for run in runs:
        for task, score in run["scores"].items():
            assert score == run["lmms_eval"][task][report["metrics"][task]]
            stock = runs[0]["scores"][task]
            if stock:
                assert run["percent_of_stock"][task] == pytest.approx(100 * score / stock)
    table = (out / "table.md").read_text()
    assert table.strip() == report["table"] and table.count("\n") == 2 + len(runs)
    printed = capsys.readouterr().out
    assert "| VisionZip‡ 6+2 (tuned) | 8 |" in table and table in printed + "\n"
    # One tower pass per image at 6+2: the tuned projector takes the training-free run's rows, and a question's
    # generation and choices share theirs.
    shared = dict(
        re.findall(r"\[eval\] (VisionZip\S* \d\+\d(?: \(tuned\))?): tower passes: (\d+ media computed, \d+)", printed)
    )
    assert shared["VisionZip‡ 6+2 (tuned)"].startswith("0 media computed")
    assert shared["VisionZip 6+2"].startswith("6 media computed")


def test_qwen_budgets_are_ratios_and_its_tokens_a_share_of_each_image(eval_assets, tmp_path):
    from transformers import AutoModelForImageTextToText

    from visionzip_tune.export import export_projector
    from visionzip_tune.families import apply_visionzip
    from visionzip_tune.data.processing import load_processing

    demo = eval_assets[2]
    spec = TinySpec(family="qwen2_5_vl", image_size=112, vision_hidden=32, vision_layers=3, text_hidden=32)
    base = save_tiny(tmp_path / "qwen", spec)
    model = apply_visionzip(AutoModelForImageTextToText.from_pretrained(base), dominant_ratio=0.3, contextual_ratio=0.1)
    export = export_projector(
        model, tmp_path / "export", metadata={"base_model": str(base)}, processing=load_processing(base)
    )
    out = tmp_path / "eval"
    argv = ["eval", "--projector", str(export), "--budgets", "0.2+0.05", "--held-out", str(demo.eval), "--limit", "3"]
    assert cli([*argv, "--image-folder", str(demo.images), "--output-dir", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["stock", "VisionZip 0.2+0.05", "VisionZip‡ 0.3+0.1 (tuned)"]
    assert [r["vision_tokens"] for r in runs] == ["100%", "25%", "40%"]
    assert [r["budget"] and r["budget"]["dominant_ratio"] for r in runs] == [None, 0.2, 0.3]
    assert all(set(r["scores"]) == {"heldout_gen", "heldout_mc"} for r in runs)


def test_a_failure_inside_lmms_eval_is_a_user_error_with_its_traceback_logged(eval_assets, tmp_path, capsys):
    model_dir, _, demo = eval_assets
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text(
        "task: broken\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: /nonexistent/test.parquet\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    argv = ["eval", "--model", str(model_dir), "--tasks", "broken", "--include-path", str(tasks)]
    message = cli_error([*argv, "--output-dir", str(tmp_path / "out")], capsys)
    assert "lmms-eval failed while evaluating stock on broken" in message
    assert "/nonexistent/test.parquet" in (tmp_path / "out" / "error.log").read_text()
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "gqa_typo"], "lmms-eval knows no task gqa_typo (close: gqa"),
        (["--tasks", "gqa", "--budgets", "54-10"], "'54-10' is neither DOMINANT+CONTEXTUAL, a token total"),
        (["--held-out", "x.json"], "--held-out needs --image-folder"),
        ([], "give lmms-eval tasks (--tasks gqa,pope,...) and/or a held-out JSON"),
        (["--tasks", "gqa", "--metric", "pope"], "--metric 'pope': give TASK=METRIC"),
        (["--tasks", "gqa", "--image-folder", "x"], "--image-folder x: it is the folder of --held-out's images"),
        (["--tasks", "gqa", "--batch-size", "4", "--max-batch-size", "16"], "--max-batch-size 16: it is where"),
        (["--tasks", "gqa", "--tower-share-gib", "-1"], "--tower-share-gib -1: give a size of at least 0 GiB"),
    ],
)
def test_bad_input_exits_2_with_a_message(eval_assets, tmp_path, capsys, args, message):
    model_dir, _, _ = eval_assets
    assert message in cli_error(["eval", "--model", str(model_dir), "--output-dir", str(tmp_path), *args], capsys)


def test_paths_are_checked_before_the_tasks_and_the_weights_and_nothing_is_written(eval_assets, tmp_path, capsys):
    model_dir, _, paths = eval_assets
    out = tmp_path / "out"
    cases = [
        (
            ["--model", str(tmp_path / "typo"), "--tasks", "gqa"],
            f"--model={str(tmp_path / 'typo')!r}: no such directory",
        ),
        (["--held-out", str(tmp_path / "none.json"), "--image-folder", str(paths.images)], "none.json: no such file"),
        (["--held-out", str(paths.eval), "--image-folder", str(tmp_path / "pics")], "--image-folder "),
        (["--tasks", "gqa", "--include-path", str(tmp_path / "yamls")], "yamls: no such folder"),
    ]
    for args, message in cases:
        argv = [
            "eval",
            *(["--model", str(model_dir)] if "--model" not in args else []),
            *args,
            "--output-dir",
            str(out),
        ]
        assert message in cli_error(argv, capsys)
    assert not out.exists()


def test_a_model_or_an_export_is_required(capsys):
    assert "give a model (--model) or a projector export" in cli_error(["eval", "--tasks", "gqa"], capsys)


def test_without_lmms_eval_the_command_says_how_to_install_it(monkeypatch, capsys):
    from visionzip_tune.evaluation import benchmarks

    monkeypatch.setattr(benchmarks, "LMMS_EVAL_MISSING", ModuleNotFoundError("No module named 'lmms_eval'"))
    message = cli_error(["eval", "--model", "m", "--tasks", "gqa"], capsys)
    assert "needs lmms-eval" in message and "bash tools/install_eval.sh" in message
