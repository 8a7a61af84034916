"""metrics.py: the console lines and what a resumed run keeps of metrics.jsonl."""

from __future__ import annotations

import json

from visionzip_tune.training.metrics import format_eval, format_step, kept_on_resume

STEP = {
    "step": 7,
    "loss": 1.23456,
    "lr": 1e-3,
    "grad_norm": 0.5,
    "samples_per_s": 12.34,
    "tokens_per_s": 987.6,
    "vision_tokens_per_unit": 64,
    "images": 4,
    "videos": 0,
}


def test_step_line():
    assert format_step(STEP, 300) == (
        "step   7/300 | loss 1.2346 | lr 1.00e-03 | grad 0.500 | 12.3 samples/s | 988 tok/s | 64 vision tok/unit"
    )
    assert "grad" not in format_step({**STEP, "grad_norm": None}, 300)


def test_a_budget_in_ratios_shows_the_measured_mean_per_image():
    ratios = {**STEP, "vision_tokens_per_unit": None, "vision_tokens_per_image": 7.75}
    assert format_step(ratios, 300).endswith("| 988 tok/s | 7.8 vision tok/image (mean)")


def test_a_text_only_step_says_why_its_gradient_is_zero():
    line = format_step({**STEP, "images": 0, "grad_norm": 0.0}, 300)
    assert line.endswith("| text-only step: no image or video reached the projector")
    assert "vision tok/unit" in format_step({**STEP, "images": 0, "videos": 1}, 300)


def test_eval_line_shows_each_kind_only_when_mixed():
    record = {"step": 3, "accuracy": 0.5, "correct": 4, "total": 8}
    assert format_eval({**record, "accuracy_image": 0.5}) == "[eval] step 3: accuracy 0.500 (4/8)"
    mixed = {**record, "accuracy_image": 0.75, "accuracy_video": 0.25}
    assert format_eval(mixed) == "[eval] step 3: accuracy 0.500 (4/8; image 0.750, video 0.250)"


def test_resume_keeps_training_records_up_to_the_step_and_evaluations_before_it():
    lines = [
        json.dumps({"kind": kind, "step": step})
        for kind, step in [("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3)]
    ] + ['{"kind": "train", "st']
    assert [line for line in lines if kept_on_resume(line, 2)] == lines[:3]
