"""bench/gpu_check.sh: the prepared GPU check, run here the way a CPU-only machine runs it, and its parity verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # gpu_check and the benches it reuses are scripts, not a package

import gpu_check  # noqa: E402

from visionzip_tune.algorithm import compress  # noqa: E402


def zipped(scores: torch.Tensor, hidden: torch.Tensor, dominant: int = 11, contextual: int = 3):
    """VisionZip of one CLS image (N = 1 + len(scores)) selected by ``scores``, with a fixed metric."""
    metric = torch.arange(hidden.shape[1] * 3, dtype=torch.float32).view(1, hidden.shape[1], 3).sin()
    return compress.select_and_merge(
        hidden, metric, scores[None], dominant=dominant, contextual=contextual, has_cls=True
    )


@pytest.fixture
def image():
    """(patch scores, hidden states): 24 patches scored 1.0 down to 0.5, the 11th best 1.1e-4 (relative) below the
    10th, where the cut of CLS + 10 patches falls; random hidden states of the 25 tokens."""
    scores = torch.linspace(1.0, 0.5, 24)
    scores[10] = scores[9] * (1 - 1.1e-4)
    return scores, torch.randn(1, 25, 8, generator=torch.Generator().manual_seed(0))


def test_parity_passes_the_same_selection_and_a_near_tie_swap_only(image):
    scores, hidden = image
    reference = zipped(scores, hidden)
    criteria = gpu_check.PARITY_CRITERIA["bfloat16"]

    same = gpu_check.compare_zips(reference, zipped(scores, hidden), scores[None], criteria)
    assert same["pass"] and same["agreement"] == 1.0 and same["worst_tie"] == 0.0 and same["max_diff"] == 0.0

    near = scores.clone()
    near[[9, 10]] = near[[10, 9]]  # the 10th and 11th best patches trade places: a near-tie
    swapped = gpu_check.compare_zips(reference, zipped(near, hidden), scores[None], criteria)
    assert swapped["pass"] and swapped["agreement"] == 10 / 11
    assert swapped["worst_tie"] == pytest.approx(1.1e-4, rel=0.01)
    # The fp32 criteria allow a swap only within 1e-4 of the cut, in 98% agreement: this one fails them.
    assert not gpu_check.compare_zips(
        reference, zipped(near, hidden), scores[None], gpu_check.PARITY_CRITERIA["float32"]
    )["pass"]

    far = scores.clone()
    far[[0, 23]] = far[[23, 0]]  # the best patch is dropped for the worst: a wrong selection, not a tie
    wrong = gpu_check.compare_zips(reference, zipped(far, hidden), scores[None], criteria)
    assert not wrong["pass"] and wrong["agreement"] == 10 / 11
    assert wrong["worst_tie"] == pytest.approx(float(1 - scores[23] / scores[9]))

    drifted = gpu_check.compare_zips(reference, zipped(scores, hidden * 1.5), scores[None], criteria)
    assert not drifted["pass"] and drifted["agreement"] == 1.0 and drifted["max_diff"] > criteria["max_diff"]


def test_loss_fell_compares_the_first_and_last_tenth_of_the_steps():
    falling = gpu_check.loss_fell([6.0] * 10 + [5.0] * 80 + [4.0] * 10)
    assert falling == {"steps": 100, "loss_first": 6.0, "loss_last": 4.0, "loss_fell": True}
    assert not gpu_check.loss_fell([5.0] * 10 + [4.0] * 80 + [4.9] * 10)["loss_fell"]  # 2% lower: not a fall


def test_no_tf32_restores_the_switches():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with gpu_check.no_tf32():
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path; a GPU machine runs the GPU parts")
def test_gpu_check_on_a_cpu_only_machine(tmp_path):
    import transformers

    out = tmp_path / "out"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--work", str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "no CUDA device: skipped" in done.stdout
    report = json.loads((out / "gpu_check.json").read_text())

    assert report["device"] == "cpu" and report["ok"] is True
    assert report["environment"]["packages"]["transformers"] == transformers.__version__
    assert report["environment"]["torch"] == torch.__version__ and "gpu" not in report["environment"]
    assert [skip["part"] for skip in report["skipped"]] == ["parity", "tower", "step", "demo", "eval"]
    assert all("no CUDA device" in skip["why"] for skip in report["skipped"])
    parts = report["parts"]
    assert list(parts) == ["parity", "tower", "step", "demo", "eval"]

    # Parity: CPU bf16 against CPU fp32, every budget; bf16 really differs, within the bf16 criteria.
    parity = parts["parity"]
    assert parity["status"] == "pass"
    budgets = [(row["dtype"], row["budget"]) for row in parity["rows"]]
    assert budgets == [("bfloat16", "54+10"), ("bfloat16", "108+20"), ("bfloat16", "162+30")]
    bounds = gpu_check.PARITY_CRITERIA["bfloat16"]
    for row in parity["rows"]:
        assert row["pass"] and bounds["min_agreement"] <= row["agreement"] <= 1.0
        assert 0 < row["mean_diff"] <= row["max_diff"] <= bounds["max_diff"]
        assert row["worst_tie"] <= bounds["tie_tolerance"]

    # Benches: every variant and budget measured (no timing asserted), the FLOP prediction falling with the tokens.
    tower = parts["tower"]
    assert tower["status"] == "ok"
    assert {row["variant"] for row in tower["rows"]} == {"stock", "visionzip", "eager", "selection"}
    assert all(r["median_ms"] > 0 for r in tower["rows"])
    step = parts["step"]
    tokens = [(row["budget"], row["tokens_per_image"]) for row in step["rows"]]
    assert tokens == [("stock", 576), ("162+30", 192), ("54+10", 64)]
    assert 1.0 == step["rows"][0]["flop_ratio"] > step["rows"][1]["flop_ratio"] > step["rows"][2]["flop_ratio"]
    assert all(r["step_ms"] > 0 and r["peak_mib"] is None for r in step["rows"])

    # Demo: 40 steps, the loss fell, the export loads back into a fresh model (16 tokens per image, tuned weights).
    demo = parts["demo"]
    assert demo["status"] == "pass" and demo["exit_code"] == 0 and demo["steps"] == 40
    assert demo["loss_fell"] and demo["loss_last"] <= 0.95 * demo["loss_first"]
    assert demo["loads_back"] and demo["tensors_match"] and demo["projector_trained"]
    assert demo["feature_rows"] == [16, 16] and demo["tokens_per_image"] == 16
    assert 0 <= demo["accuracy_before"] <= 1 and 0 <= demo["accuracy_after"] <= 1

    # Eval: the lmms-eval model at batch 1 and 8, stock and 54+10; in float32 on the CPU the answers do not move.
    evaluation = parts["eval"]
    assert evaluation["status"] == "ok" and evaluation["reference_batch"] == 1
    assert [(r["setting"], r["batch"]) for r in evaluation["rates"]] == [
        ("stock", 1),
        ("stock", 8),
        ("54+10", 1),
        ("54+10", 8),
    ]
    assert all(r["ttft_ms"] > 0 for r in evaluation["rates"])
    for row in evaluation["invariance"]:
        assert row["texts_identical"] == row["choices_identical"] == row["greedy_identical"] == 1.0, row
        assert row["loss_max_diff"] <= 1e-5, row

    table = (out / "gpu_check.md").read_text()
    assert "Skipped (GPU only)" in table and "| cpu bfloat16 |" in table and "export loads back: yes" in table
    assert table in done.stdout  # the table ends the output
    assert "demo: step 40/40" in (out / "gpu_check.log").read_text()
    assert "[train] done" in (out / "demo.log").read_text()
