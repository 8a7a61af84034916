"""Checkpoints of a real (single-process) DeepSpeed engine: layout, atomicity, pruning, exact resume, resolution."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from visionzip_tune.training import checkpoint
from visionzip_tune.training.config import load_config
from visionzip_tune.training.build import deepspeed_config
from visionzip_tune.training.ops import skip_shared_memory_comm
from visionzip_tune.distributed import init_distributed
from visionzip_tune.errors import UserError


def make_engine(perturb: bool = False):
    """A frozen layer + a trainable head under ZeRO-2 with AdamW and a LambdaLR schedule; its trainable params.
    ``perturb``: the head starts elsewhere (the frozen layer is always the same, as a reloaded base model's)."""
    import deepspeed

    init_distributed()
    skip_shared_memory_comm()  # as a run does before DeepSpeed initialises
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    if perturb:
        with torch.no_grad():
            model[2].weight.add_(1.0)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=0.1)
    cfg = load_config(None, ["train.micro_batch_size=2", "deepspeed.zero_stage=2", "deepspeed.bf16=false"])
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
        config=deepspeed_config(cfg, 1),
    )
    return engine, trainable


def step(engine, generator: torch.Generator) -> None:
    x = torch.randn(2, 4, generator=generator)
    engine.backward(engine(x).pow(2).mean())
    engine.step()


def test_save_writes_the_layout_atomically_and_prunes(tmp_path):
    engine, trainable = make_engine()
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "checkpoints"
    (root / ".step-000002.tmp-write").mkdir(parents=True)  # a leftover of a run killed while writing
    for n in (1, 2, 3):
        step(engine, g)
        path = checkpoint.save_checkpoint(engine, tmp_path, n, trainable, {"sampler": {"epoch": 0}}, keep=2)
    assert path == root / "step-000003"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000003"]
    assert (root / "latest").read_text() == "step-000003\n"
    assert {p.name for p in path.iterdir()} >= {"trainable.safetensors", "state.json", "rng-rank000.pt", "ds"}
    saved = load_file(path / "trainable.safetensors")
    assert set(saved) == {"2.weight", "2.bias"}  # frozen layer 0 is not in it
    for name, param in trainable:
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], param.detach())
    assert json.loads((path / "state.json").read_text()) == {"step": 3, "sampler": {"epoch": 0}}
    assert checkpoint.latest_checkpoint(tmp_path) == path


def test_load_restores_weights_optimizer_schedule_and_rng(tmp_path):
    """Continuing after a reload gives bit-identical weights to continuing without one."""
    engine, trainable = make_engine()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        step(engine, g)
    torch.manual_seed(123)
    checkpoint.save_checkpoint(engine, tmp_path, 2, trainable, {"world_size": 1})
    expected_draw = torch.rand(3)
    data_state = g.get_state()
    for _ in range(2):
        step(engine, g)
    reference = {n: p.detach().clone() for n, p in trainable}
    reference_lr = engine.get_lr()

    fresh, fresh_trainable = make_engine(perturb=True)  # the checkpoint must overwrite the trainable weights
    state = checkpoint.load_checkpoint(fresh, checkpoint.resolve_resume("auto", tmp_path), world_size=1)
    assert state["step"] == 2
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored
    g.set_state(data_state)
    for _ in range(2):
        step(fresh, g)
    for name, param in fresh_trainable:
        assert torch.equal(param.detach(), reference[name]), name
    assert fresh.get_lr() == reference_lr


def test_resolve_resume(tmp_path):
    assert checkpoint.resolve_resume("never", tmp_path) is None
    assert checkpoint.resolve_resume("auto", tmp_path) is None  # nothing yet: start fresh
    engine, trainable = make_engine()
    path = checkpoint.save_checkpoint(engine, tmp_path, 5, trainable, {})
    assert checkpoint.resolve_resume("auto", tmp_path) == path
    assert checkpoint.resolve_resume(str(path), tmp_path / "elsewhere") == path  # a checkpoint directory
    assert checkpoint.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == path  # a run directory
    with pytest.raises(UserError, match="neither 'auto', 'never', a checkpoint directory"):
        checkpoint.resolve_resume(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step-000009\n")
    with pytest.raises(UserError, match="names step-000009, which is not a complete checkpoint"):
        checkpoint.resolve_resume("auto", tmp_path)


def test_resume_with_another_world_size_is_refused(tmp_path):
    engine, trainable = make_engine()
    path = checkpoint.save_checkpoint(engine, tmp_path, 1, trainable, {"world_size": 8})
    with pytest.raises(UserError, match="written by 8 processes but this run has 1.*resume with 8 processes"):
        checkpoint.load_checkpoint(engine, path, world_size=1)
