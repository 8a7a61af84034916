"""Resumable evals: the answer store keeps every answer under a key of everything that decides it, an eval killed
midway and run again with the same command recomputes nothing it had answered and ends with the same results, and
a changed budget (or model, projector, prompt, image) is never served from the store."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import lmms_eval_or_skip

from visionzip_tune.__main__ import main as cli
from visionzip_tune.evaluation.answers import AnswerStore, request_key, setting_identity
from visionzip_tune.families import apply_visionzip, remove_visionzip

lmms_eval_or_skip()
from visionzip_tune.evaluation.lmms import ZippedModel  # noqa: E402


def test_the_store_keeps_answers_across_opens_and_drops_a_line_a_kill_cut_short(tmp_path):
    identity = {"weights": "v1:abc", "visionzip": {"dominant": 6}}
    store = AnswerStore(tmp_path, "VisionZip 6+2", identity, rank=0)
    store.put([("a", "red"), ("b", [0.5, True])])
    store.close()
    with open(store.path, "a") as f:
        f.write('{"key": "c", "answ')  # a kill in the middle of a write
    other_rank = AnswerStore(tmp_path, "VisionZip 6+2", identity, rank=1)
    assert other_rank.folder == store.folder and other_rank.loaded == 2  # every rank reads every rank's file
    again = AnswerStore(tmp_path, "VisionZip 6+2", identity, rank=0)
    assert again.get("a") == "red" and again.get("b") == [0.5, True] and again.get("c") is None
    again.put([("c", "blue")])
    again.close()
    assert AnswerStore(tmp_path, "VisionZip 6+2", identity).answers == {"a": "red", "b": [0.5, True], "c": "blue"}
    assert store.path.read_text().count("\n") == 3  # the cut line is gone, not glued to the next one
    changed = AnswerStore(tmp_path, "VisionZip 6+2", {**identity, "visionzip": {"dominant": 3}})
    assert changed.folder != store.folder and changed.loaded == 0


def test_keys_follow_the_inputs_and_the_setting_follows_budget_and_projector(tiny_clip):
    ids, pixels = torch.tensor([1, 5, 7]), torch.zeros(1, 3, 4, 4)
    key = request_key("generate_until", {"input_ids": ids, "pixel_values": pixels}, {"max_new_tokens": 4})
    assert key == request_key(
        "generate_until", {"pixel_values": pixels.clone(), "input_ids": ids}, {"max_new_tokens": 4}
    )
    assert key != request_key(
        "generate_until", {"input_ids": ids, "pixel_values": pixels + 1e-3}, {"max_new_tokens": 4}
    )
    assert key != request_key("generate_until", {"input_ids": ids, "pixel_values": pixels}, {"max_new_tokens": 5})
    assert key != request_key("loglikelihood", {"input_ids": ids, "pixel_values": pixels}, {"max_new_tokens": 4})

    model, _ = tiny_clip
    stock = setting_identity(model)
    apply_visionzip(model, 54, 10)
    zipped = setting_identity(model)
    remove_visionzip(model)
    assert setting_identity(model) == stock != zipped
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.bias.add_(1e-3)
    assert setting_identity(model)["projector"] != stock["projector"]
    assert setting_identity(model)["weights"] == stock["weights"]  # the base weights are the same
    assert setting_identity(model, export_checksum="x") != setting_identity(model)


class Killed(BaseException):
    """What a kill looks like to the eval: it stops in the middle of a model call."""


@pytest.fixture
def model_calls(monkeypatch):
    """Every batch the model answers, as its number of requests (``calls``); ``kill_after(n)`` stops the eval at
    the start of the (n + 1)-th model call."""

    class Calls(list):
        limit = None

        def kill_after(self, n: int) -> None:
            self.limit = n

    calls = Calls()

    def counted(method):
        def run(self, rows):
            if calls.limit is not None and len(calls) >= calls.limit:
                raise Killed
            calls.append(len(rows))
            return method(self, rows)

        return run

    monkeypatch.setattr(ZippedModel, "_generate", counted(ZippedModel._generate))
    monkeypatch.setattr(ZippedModel, "_score", counted(ZippedModel._score))
    return calls


def eval_argv(assets, out, *extra: str) -> list[str]:
    model_dir, export, demo = assets
    return [
        "eval",
        "--projector",
        str(export),
        "--held-out",
        str(demo.eval),
        "--image-folder",
        str(demo.images),
        "--batch-size",
        "4",
        "--limit",
        "6",
        "--output-dir",
        str(out),
        *extra,
    ]


def scores(out) -> list[dict]:
    return [run["lmms_eval"] for run in json.loads((out / "results.json").read_text())["runs"]]


def test_a_killed_eval_resumes_recomputing_nothing_it_had_answered(eval_assets, tmp_path, model_calls):
    reference = tmp_path / "reference"
    assert cli(eval_argv(eval_assets, reference)) == 0
    every_request, calls = sum(model_calls), len(model_calls)
    model_calls.clear()

    out = tmp_path / "resumed"
    out.mkdir()
    (out / "results.json").write_text('{"runs": []}')  # an earlier eval's, which this one must not leave behind
    model_calls.kill_after(calls // 2)  # in the second of the three settings
    with pytest.raises(Killed):
        cli(eval_argv(eval_assets, out, "--batch-size", "3"))
    answered = sum(model_calls)
    assert 0 < answered < every_request and not (out / "results.json").exists()

    model_calls.clear()
    model_calls.kill_after(None)
    assert cli(eval_argv(eval_assets, out)) == 0  # the same command (another batch size would do as well)
    assert sum(model_calls) == every_request - answered
    assert scores(out) == scores(reference)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sum(run["throughput"]["from_store"] for run in runs) == answered

    model_calls.clear()
    assert cli(eval_argv(eval_assets, out)) == 0 and model_calls == []  # all answered: nothing runs


def test_a_changed_budget_is_not_served_from_the_store(eval_assets, tmp_path, model_calls):
    out = tmp_path / "eval"
    assert cli(eval_argv(eval_assets, out, "--budgets", "6+2", "--limit", "3")) == 0
    model_calls.clear()
    assert cli(eval_argv(eval_assets, out, "--budgets", "3+1", "--limit", "3")) == 0
    runs = {run["label"]: run["throughput"] for run in json.loads((out / "results.json").read_text())["runs"]}
    assert runs["stock"]["computed"] == 0 and runs["VisionZip‡ 6+2 (tuned)"]["computed"] == 0
    assert runs["VisionZip 3+1"]["from_store"] == 0 and runs["VisionZip 3+1"]["computed"] == sum(model_calls) > 0
