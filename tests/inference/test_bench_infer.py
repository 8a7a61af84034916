"""`python -m visionzip_tune bench-infer`: every stage timed from the model's own pass, token counts that match the
budgets, the paper's FLOP formula next to the measured ratios; hooks leave the model as they found it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EVAL_SPEC, cli_error, load_tiny
from PIL import Image

from visionzip_tune.__main__ import main as cli
from visionzip_tune.inference.timing import STAGES, kv_cache_bytes, prefill_flops
from visionzip_tune.export import read_export
from visionzip_tune.families import apply_visionzip, projector_parameters
from visionzip_tune.inference.stage_timer import Clock, instrumented
from visionzip_tune.inference.variants import Switcher, Setting


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "shape.png"
    Image.new("RGB", (90, 60), (30, 160, 220)).save(path)
    return path


def test_bench_infer_json_has_every_stage_and_the_budgets_token_counts(eval_assets, picture, tmp_path, capsys):
    model_dir, export, _ = eval_assets
    out = tmp_path / "bench.json"
    argv = ["bench-infer", "--projector", str(export), "--image", str(picture), "--budgets", "6+2,12"]
    assert cli([*argv, "--new-tokens", "3", "--warmup", "0", "--repeats", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["timer"] == "perf_counter" and report["device"] == "cpu"
    runs = report["runs"]
    assert [r["label"] for r in runs] == ["stock", "VisionZip 6+2", "VisionZip 10+2", "VisionZip‡ 6+2 (tuned)"]
    patches = (EVAL_SPEC.image_size // EVAL_SPEC.patch_size) ** 2
    assert [r["vision_tokens"] for r in runs] == [patches, 8, 12, 8]  # stock LLaVA drops CLS
    assert [r["image_tokens"] for r in runs] == [[patches], [8], [12], [8]]
    text = runs[0]["total_tokens"] - patches
    assert all(r["total_tokens"] == text + r["vision_tokens"] for r in runs)
    for r in runs:
        assert set(r["ms"]) == set(STAGES) - {"decode"} and r["decode_tokens_per_s"] > 0
        assert all(value >= 0 for key, value in r["ms"].items() if key != "visionzip")
        assert r["ms"]["ttft"] >= r["ms"]["llm_prefill"] > 0 and r["ms"]["vision_tower"] > 0
        assert r["peak_memory_bytes"] is None  # CPU
        assert r["prefill_flops"] == prefill_flops_by_hand(r["total_tokens"])
        assert r["flops_ratio"] == pytest.approx(r["prefill_flops"] / runs[0]["prefill_flops"])
        assert r["prefill_ratio"] == pytest.approx(r["ms"]["llm_prefill"] / runs[0]["ms"]["llm_prefill"])
        assert r["kv_cache_bytes"] == 2 * EVAL_SPEC.text_layers * EVAL_SPEC.text_hidden * (r["total_tokens"] + 3) * 4
    table = capsys.readouterr().out
    assert "Eq.1 FLOPs ratio" in table and table.count("\n") >= 2 + len(runs)


def prefill_flops_by_hand(n: int) -> int:
    d, m, layers = EVAL_SPEC.text_hidden, EVAL_SPEC.text_hidden * 4, EVAL_SPEC.text_layers
    return layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def test_flops_and_kv_cache_formulas(tiny_clip):
    model, _ = tiny_clip
    text = model.config.get_text_config()
    d, m, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    assert prefill_flops(model.config, 100) == layers * (4 * 100 * d**2 + 2 * 100**2 * d + 2 * 100 * d * m)
    assert kv_cache_bytes(model.config, 10, torch.bfloat16) == 2 * layers * d * 10 * 2


def test_instrumentation_marks_each_stage_and_restores_the_model(eval_assets):
    model, processor = load_tiny(eval_assets[0])
    apply_visionzip(model, 6, 2, processor=processor)
    override = model.model.__dict__["get_image_features"]
    inputs = processor(images=Image.new("RGB", (56, 56)), text="<image> hi", return_tensors="pt")
    with instrumented(model, Clock(torch.device("cpu"))) as marks, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert [len(marks.spans[s]) for s in ("vision", "tower", "projector", "llm")] == [1, 1, 1, 3]
    assert len(marks.head) == 3
    assert marks.total_ms("vision") >= marks.total_ms("tower") + marks.total_ms("projector")
    assert model.model.__dict__["get_image_features"] is override  # VisionZip's override is back
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model_stock, _ = load_tiny(eval_assets[0])
    with instrumented(model_stock, Clock(torch.device("cpu"))):
        assert "get_image_features" in model_stock.model.__dict__
    assert "get_image_features" not in model_stock.model.__dict__  # the class's method again


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give an image (--image FILE) and/or a video"),
        (["--image", "x.png", "--budgets", "1+"], "'1+' is neither DOMINANT+CONTEXTUAL, a token total"),
        (["--image", "missing.png"], "--image: missing image missing.png"),
        (["--image", "x.png", "--video-frames", "4"], "--video-frames 4: it sets the frames taken from --video"),
    ],
)
def test_bad_input_exits_2_with_a_message(eval_assets, capsys, args, message):
    assert message in cli_error(["bench-infer", "--model", str(eval_assets[0]), *args], capsys)


def test_switcher_moves_one_model_between_stock_budgets_and_the_tuned_projector(eval_assets):
    model_dir, export, _ = eval_assets
    model, _ = load_tiny(model_dir)
    stock = {name: p.detach().clone() for name, p in projector_parameters(model).items()}
    switch = Switcher(model, str(export), read_export(export))

    def same_projector() -> bool:
        return all(torch.equal(p, stock[name]) for name, p in projector_parameters(model).items())

    switch.to(Setting("tuned", None, tuned=True))
    assert model.config.visionzip["dominant"] == 6 and not same_projector()
    switch.to(Setting("3+1", {"dominant": 3, "contextual": 1}))
    assert (model.config.visionzip["dominant"], model.config.visionzip["contextual"]) == (3, 1) and same_projector()
    switch.to(Setting("stock", None))
    assert getattr(model.config, "visionzip", None) is None and same_projector()
