"""Multi-process training under torchrun (gloo, CPU) with ZeRO-2 and ZeRO-3, and a SIGKILL in the middle of a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO, ROOT, records, text_only_samples, train_args
from safetensors.torch import load_file

PROJECTOR = {f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}

pytestmark = pytest.mark.slow


def env() -> dict[str, str]:
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }


def one_image_data(paths, out: Path) -> Path:
    """One image sample among 7 text-only ones: with 2 ranks x 2 samples per step, the step holding the image has a
    text-only micro-batch on the other rank, and the other step is text-only on both ranks."""
    samples = json.loads(paths.train.read_text())
    out.write_text(json.dumps([next(s for s in samples if "image" in s), *text_only_samples(7)]))
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_torchrun_two_processes_train_and_export(train_assets, tmp_path, stage):
    out = tmp_path / "run"
    data = one_image_data(train_assets[1], tmp_path / "one-image.json")
    args = train_args(
        train_assets,
        out,
        f"data.path={data}",
        f"deepspeed.zero_stage={stage}",
        "train.max_steps=null",
        "train.epochs=2",
        "train.micro_batch_size=2",
        "train.save_every=2",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(29400 + stage),
        "-m",
        "visionzip_tune",
        "train",
        str(DEMO),
        *args,
    ]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if stage == 3:  # built under zero.Init: no rank ever held the whole model
        assert "[train] ZeRO-3: weights sharded across ranks at load" in done.stdout
    train = records(out, "train")
    steps = len(train)
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # 2 epochs of 8 samples, 4 per step
    assert sorted(r["images"] for r in train) == [0, 0, 1, 1]
    assert all(r["samples_per_s"] > 0 and r["vision_tokens"] == 8 * r["images"] for r in train)
    assert [r["step"] for r in records(out, "eval")] == [0, steps]
    last = out / "checkpoints" / f"step-{steps:06d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == last.name
    assert {"rng-rank000.pt", "rng-rank001.pt", "trainable.safetensors", "state.json"} <= {
        p.name for p in last.iterdir()
    }
    saved = load_file(last / "trainable.safetensors")
    assert set(saved) == PROJECTOR  # gathered full tensors, also under ZeRO-3
    exported = load_file(out / "export" / "projector.safetensors")
    for name, tensor in saved.items():
        assert torch.equal(exported[name.removeprefix("model.")], tensor)
    assert json.loads((out / "export" / "visionzip.json").read_text())["step"] == steps


def test_sigkill_mid_run_then_rerun_ends_like_an_uninterrupted_run(train_assets, tmp_path):
    def command(out: Path) -> list[str]:
        args = train_args(train_assets, out, "train.max_steps=10", "train.save_every=1", "train.micro_batch_size=2")
        return [sys.executable, "-m", "visionzip_tune", "train", str(DEMO), *args]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(command(whole), env=env(), capture_output=True, timeout=600, check=True)

    proc = subprocess.Popen(command(killed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "export").exists()
    interrupted_at = latest.read_text().strip()

    done = subprocess.run(command(killed), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints' / interrupted_at}" in done.stdout
    for name in ("checkpoints/step-000010/trainable.safetensors", "export/projector.safetensors"):
        a, b = load_file(whole / name), load_file(killed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["loss"] for r in records(whole, "train")] == [r["loss"] for r in records(killed, "train")]


def test_train_sh_launches_torchrun_and_prints_the_run_directory(train_assets, tmp_path):
    out = tmp_path / "run"
    args = train_args(train_assets, out, "train.max_steps=2", "train.micro_batch_size=2")
    done = subprocess.run(
        ["bash", str(ROOT / "train.sh"), str(DEMO), *args],
        env={**env(), "NPROC_PER_NODE": "2", "MASTER_PORT": "29431"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"run directory: {out}"
    assert (out / "export" / "visionzip.json").is_file()
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["world_size"] == 2


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_zero3_full_and_lora_runs_load_sharded_and_export_whole_tensors(train_assets, tmp_path, mode):
    """Built under zero.Init (each rank holds a shard), trained, and exported: the full model and the LoRA adapter
    come out as whole tensors."""
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    args = train_args(
        train_assets,
        out,
        "deepspeed.zero_stage=3",
        f"train.mode={mode}",
        *(["train.lora_r=4", "train.lora_alpha=8"] if mode == "lora" else []),
        "train.max_steps=2",
        "train.micro_batch_size=2",
        "data.eval_path=null",
    )
    port = str(29441 + (mode == "lora"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        port,
        "-m",
        "visionzip_tune",
        "train",
        str(DEMO),
        *args,
    ]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[train] ZeRO-3: weights sharded across ranks at load" in done.stdout
    base = AutoModelForImageTextToText.from_pretrained(train_assets[0])
    if mode == "full":
        saved = dict(AutoModelForImageTextToText.from_pretrained(out / "export" / "model").named_parameters())
        base_params = dict(base.named_parameters())
        assert {n: p.shape for n, p in saved.items()} == {n: p.shape for n, p in base_params.items()}
        # Whole TRAINED tensors were gathered: every LLM weight moved, the frozen tower is bit-identical.
        llm = [n for n in saved if ".language_model." in n]
        tower = [n for n in saved if ".vision_tower." in n]
        assert llm and all(not torch.equal(saved[n], base_params[n]) for n in llm)
        assert tower and all(torch.equal(saved[n], base_params[n]) for n in tower)
    else:
        adapter = load_file(out / "export" / "adapter" / "adapter_model.safetensors")
        assert adapter and all(t.numel() > 0 and 4 in t.shape for t in adapter.values())
