"""The lmms-eval plugin: local parquet tasks (generate and multiple choice) through ``visionzip`` end to end, with
the vision tokens the model receives counted, a tuned export loaded, and lmms-eval's own command line."""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys

import pytest
from conftest import ROOT, lmms_eval_or_skip
from PIL import Image

from visionzip_tune.errors import UserError
from visionzip_tune.evaluation.lmms_tasks import write_choice_tasks

lmms_eval = lmms_eval_or_skip()
from lmms_eval import evaluator  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from visionzip_tune.evaluation.lmms import VisionZipModel, cut_at, generation_settings  # noqa: E402

TASKS = ["heldout_gen", "heldout_mc"]
DISTRIBUTED_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


@pytest.fixture(scope="module")
def tasks_dir(eval_assets, tmp_path_factory):
    _, _, demo = eval_assets
    out = tmp_path_factory.mktemp("lmms-tasks")
    names, skipped = write_choice_tasks(demo.eval, demo.images, out)
    assert names == TASKS and skipped == 0
    return out


def evaluate(lm, tasks_dir) -> dict:
    manager = TaskManager("WARNING", include_path=str(tasks_dir))
    return evaluator.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, log_samples=True)


def count_vision_tokens(model) -> list[int]:
    """Image and video placeholders in the input ids of every forward call that reads a whole prompt (a scored
    answer, or generate's prefill: its decode steps read one token each). The model itself refuses a call whose
    features do not fill its placeholders exactly (get_placeholder_mask)."""
    seen = []
    placeholders = [model.config.image_token_id, getattr(model.config, "video_token_id", None)]

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            seen.append(sum(int((ids == token).sum()) for token in placeholders if token is not None))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def normalised(text: str) -> str:
    """exact_match's ignore_case + ignore_punctuation."""
    return re.sub(f"[{re.escape(string.punctuation)}]", "", text.lower()).strip()


def losses(results: dict) -> list[float]:
    return [resp[0][0] for sample in results["samples"]["heldout_mc"] for resp in sample["resps"]]


def test_plugin_scores_generate_and_choices_with_d_plus_c_tokens_and_the_tuned_export(eval_assets, tasks_dir):
    model_dir, export, demo = eval_assets
    held_out = json.loads(demo.eval.read_text())
    untuned = VisionZipModel(pretrained=str(model_dir), dominant=6, contextual=2)
    seen = count_vision_tokens(untuned.model)
    results = evaluate(untuned, tasks_dir)
    # every request reached the model with one image of exactly D + C = 8 placeholder tokens
    requests = len(held_out) + sum(len(sample["choices"]) for sample in held_out)
    assert seen == [8] * requests
    gen, mc = results["results"]["heldout_gen"], results["results"]["heldout_mc"]
    assert 0 <= gen["exact_match,none"] <= 1 and 0 <= mc["acc,none"] <= 1
    gold = [sample["conversations"][-1]["value"] for sample in held_out]
    answers = {sample["doc_id"]: sample["filtered_resps"][0] for sample in results["samples"]["heldout_gen"]}
    expected = sum(normalised(answers[k]) == normalised(g) for k, g in enumerate(gold)) / len(held_out)
    assert gen["exact_match,none"] == pytest.approx(expected)
    # multiple choice: each document scores every choice, the lowest loss wins
    for sample in results["samples"]["heldout_mc"]:
        choices = held_out[sample["doc_id"]]["choices"]
        scored = [resp[0][0] for resp in sample["resps"]]
        assert len(scored) == len(choices) and all(loss > 0 for loss in scored)
        picked = choices[min(range(len(scored)), key=scored.__getitem__)]
        assert sample["acc"] == float(picked == gold[sample["doc_id"]])

    tuned = VisionZipModel(projector=str(export))
    assert tuned.model.config.visionzip["dominant"] == 6 and tuned.prompter.templater.template == "chat_template"
    seen_tuned = count_vision_tokens(tuned.model)
    tuned_results = evaluate(tuned, tasks_dir)
    assert seen_tuned == [8] * requests
    assert losses(tuned_results) != pytest.approx(losses(results), abs=1e-4)  # the tuned projector is in use


def test_model_args_errors_name_the_problem(eval_assets):
    model_dir, export, _ = eval_assets
    with pytest.raises(UserError, match="with a projector export the export's budget is used"):
        VisionZipModel(projector=str(export), dominant=6, contextual=2)
    with pytest.raises(UserError, match="takes a VisionZip budget in tokens per image .*, not eagre"):
        VisionZipModel(pretrained=str(model_dir), dominant=6, contextual=2, eagre=True)
    with pytest.raises(UserError, match="template=vicuna: choose one of vicuna_v1, chat_template"):
        VisionZipModel(pretrained=str(model_dir), template="vicuna")
    with pytest.raises(UserError, match="dtype half: choose one of auto, float32"):
        VisionZipModel(pretrained=str(model_dir), dtype="half")


def test_generation_settings_are_greedy_unless_the_task_samples():
    assert generation_settings({"temperature": 0, "do_sample": True, "max_new_tokens": 4}) == {
        "max_new_tokens": 4,
        "num_beams": 1,
        "do_sample": False,
    }
    sampled = generation_settings({"temperature": 0.7, "do_sample": True, "top_p": 0.9})
    assert sampled["do_sample"] and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9
    assert cut_at("red\nUSER: more", ["\n", "USER:"]) == "red" and cut_at("blue", None) == "blue"


def test_the_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    assert get_model("visionzip") is VisionZipModel


@pytest.mark.slow  # a fresh Python importing lmms-eval (about 20 s on 2 cores)
def test_lmms_eval_command_line_runs_both_tasks(eval_assets, tasks_dir, tmp_path):
    model_dir, export, _ = eval_assets
    out = tmp_path / "out"
    model_args = f"pretrained={model_dir},projector={export}"
    command = [sys.executable, "-m", "lmms_eval", "--model", "visionzip", "--model_args", model_args]
    command += ["--tasks", ",".join(TASKS), "--include_path", str(tasks_dir), "--output_path", str(out)]
    # A process group set up by an earlier in-process training test leaves RANK, WORLD_SIZE, ... in the environment,
    # which would make lmms-eval's accelerate start a distributed run.
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.rglob("*_results.json")
    written = json.loads(path.read_text())
    assert set(written["results"]) == set(TASKS)
    assert 0 <= written["results"]["heldout_mc"]["acc,none"] <= 1
    assert written["config"]["model"] == "visionzip"


@pytest.mark.parametrize("family", ["llava_next", "video_llava", "llava_onevision"])
def test_every_family_answers_and_scores_images_and_videos(family, tmp_path):
    """One image request and (video families) one video request, outside lmms-eval's evaluator: each reaches the
    model with the family's zipped count (crops x K per image, frames x K per video)."""
    from lmms_eval.api.instance import Instance

    from visionzip_tune.families import tokens_per_video
    from visionzip_tune.families.llava_next import crop_count
    from visionzip_tune.demo.tiny import TinySpec, save_tiny

    spec = TinySpec(family=family, image_size=56, patch_size=14, vision_hidden=32, vision_layers=2, text_hidden=32)
    model_dir = save_tiny(tmp_path / family, spec)
    frames = tmp_path / "frames"
    frames.mkdir()
    for t in range(4):
        Image.new("RGB", (64, 64), (40 * t, 20, 120)).save(frames / f"{t:03d}.png")
    picture = Image.new("RGB", (112, 56), (200, 30, 30))
    lm = VisionZipModel(pretrained=str(model_dir), dominant=5, contextual=2, video_frames=4)
    seen = count_vision_tokens(lm.model)
    docs = [{"visual": [picture]}]
    if getattr(lm.model.config, "video_token_id", None) is not None:
        docs.append({"visual": [str(frames)]})  # a directory of frames, as a task's video path
    lm.task_dict = {"t": {"test": docs}}

    def request(kind, k, second):
        args = ("What is it?", second, lambda doc: doc["visual"], k, "t", "test")
        return Instance(kind, args, idx=0, metadata={"task": "t", "doc_id": k, "repeats": 1})

    answers = lm.generate_until([request("generate_until", k, {"max_new_tokens": 2}) for k in range(len(docs))])
    scored = lm.loglikelihood([request("loglikelihood", k, " red") for k in range(len(docs))])
    assert all(isinstance(a, str) for a in answers) and all(r.text[0] > 0 for r in scored)
    config = lm.model.config
    tiled = family != "video_llava"  # the pad transform makes the image square: a 2 x 2 grid + the base crop
    expected = [(crop_count(config, (112, 112)) if tiled else 1) * 7] + [4 * 7] * (len(docs) - 1)
    if len(docs) > 1:
        assert expected[1] == tokens_per_video(config, 4)
    assert seen == expected * 2  # generate's prefills, then the scored answers
