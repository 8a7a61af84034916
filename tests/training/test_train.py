"""The training loop in-process (one process, real DeepSpeed on CPU): what trains, what is written, what fails."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import DEMO, load_tiny, records, text_only_samples, train_args
from PIL import Image
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from visionzip_tune.__main__ import main as cli
from visionzip_tune.training.config import load_config
from visionzip_tune.distributed import init_distributed
from visionzip_tune.errors import UserError
from visionzip_tune.export import load_projector
from visionzip_tune.families import apply_visionzip, language_model, projector_modules, vision_tower
from visionzip_tune.training.loop import train


def run(assets, out_dir, *overrides):
    """Train in this process; returns the trained model."""
    return train(load_config(DEMO, train_args(assets, out_dir, *overrides)), init_distributed(), recipe=str(DEMO))


def changed_names(trained, base) -> set[str]:
    """Names of the trained model's parameters that differ (in any bit) from the base model's."""
    base_params = dict(base.named_parameters())
    return {
        name
        for name, p in trained.named_parameters()
        if ".lora_" not in name
        and not torch.equal(p.detach(), base_params[name.replace("base_model.model.", "").replace(".base_layer", "")])
    }


def names_of(model, module) -> set[str]:
    prefix = next(name for name, m in model.named_modules() if m is module)
    return {f"{prefix}.{name}" for name, _ in module.named_parameters()}


def test_projector_mode_changes_only_the_projector_and_lowers_the_loss(train_assets, tmp_path, capsys):
    out = tmp_path / "run"
    trained = run(train_assets, out, "train.max_steps=8", "train.save_every=4", "train.micro_batch_size=3")
    printed = capsys.readouterr()
    assert printed.out.count("[train] compression: VisionZip") == 1 and "8 vision tok/unit" in printed.out
    # the demo recipe's model.tiny and data.demo_* keys, which the command line's build_*_if_missing=false turn off
    notices = [line for line in printed.err.splitlines() if line.startswith("notice: ")]
    assert len(notices) == 2 and all("dropped, the command line wins" in line for line in notices)
    base, _ = load_tiny(train_assets[0])
    proj = names_of(trained, projector_modules(trained)["multi_modal_projector"])
    assert changed_names(trained, base) == proj  # every other tensor is bit-identical
    losses = [r["loss"] for r in records(out, "train")]
    assert len(losses) == 8 and all(k in records(out, "train")[0] for k in ("lr", "samples_per_s", "tokens_per_s"))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert records(out, "train")[0]["vision_tokens_per_unit"] == 8
    # run directory layout: config first, two atomic checkpoints, latest pointer, export
    assert load_config(out / "config.yaml").train.mode == "projector"
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000008"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000004", "step-000008"]
    saved = load_file(ckpts / "step-000008" / "trainable.safetensors")
    assert set(saved) == proj
    for name, p in trained.named_parameters():
        if name in proj:
            assert torch.equal(saved[name], p.detach().float())
    state = json.loads((ckpts / "step-000008" / "state.json").read_text())
    assert state["step"] == 8 and state["sampler"]["consumed"] > 0
    assert {"projector.safetensors", "mm_projector.bin", "visionzip.json"} <= {
        p.name for p in (out / "export").iterdir()
    }
    meta = json.loads((out / "export" / "visionzip.json").read_text())
    assert (meta["dominant"], meta["contextual"], meta["step"]) == (6, 2, 8)
    assert meta["base_model"] == str(Path(train_assets[0]).resolve())
    evals = records(out, "eval")
    held_out = len(json.loads(train_assets[1].eval.read_text()))
    assert [e["step"] for e in evals] == [0, 8]
    assert all(e["total"] == held_out and e["accuracy"] == e["correct"] / held_out for e in evals)


def test_the_end_of_a_run_says_what_it_achieved_and_commands_that_work(train_assets, tmp_path, capsys, monkeypatch):
    import shlex

    out = tmp_path / "run"
    run(train_assets, out, "train.max_steps=2")
    printed = capsys.readouterr().out
    evals = records(out, "eval")
    assert f"held-out accuracy {evals[0]['accuracy']:.3f} (step 0) -> {evals[-1]['accuracy']:.3f} (step 2)" in printed
    commands = [line.strip() for line in printed.splitlines() if line.strip().startswith("python -m visionzip_tune")]
    assert [c.split()[3] for c in commands] == ["generate", "show", "eval", "eval"]
    monkeypatch.chdir(tmp_path)
    for command in commands[:2]:  # generate and show, exactly as printed (--max-new-tokens to keep it short)
        argv = shlex.split(command)[3:] + (["--max-new-tokens", "2"] if command.split()[3] == "generate" else [])
        assert cli(argv) == 0, command
    assert (tmp_path / "kept.png").is_file()


def test_text_only_micro_batches_keep_the_projector_in_the_graph(train_assets, tmp_path):
    """A micro-batch without images has no path to the projector; the run must still step (no DeepSpeed assert)."""
    samples = json.loads(train_assets[1].train.read_text())
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(text_only_samples(8) + [s for s in samples if "image" in s][:4]))
    out = tmp_path / "run"
    run(train_assets, out, f"data.path={data}", "train.max_steps=3", "data.group_by_modality=true")
    steps = records(out, "train")
    text_only = [r for r in steps if r["images"] == 0]
    assert text_only and len(text_only) < len(steps)  # both kinds of step ran
    for r in text_only:  # the blank image's features are sliced to nothing: the projector gets exactly zero
        assert r["grad_norm"] == 0.0 and math.isfinite(r["loss"]) and r["vision_tokens"] == 0
    assert all(r["grad_norm"] > 0 for r in steps if r["images"])


def test_full_mode_trains_llm_and_projector_not_the_tower(train_assets, tmp_path):
    trained = run(
        train_assets,
        tmp_path / "run",
        "train.mode=full",
        "train.max_steps=2",
        "train.lr=1e-3",
        "train.activation_checkpointing=true",
    )
    base, _ = load_tiny(train_assets[0])
    expected = names_of(trained, projector_modules(trained)["multi_modal_projector"]) | names_of(
        trained, language_model(trained)
    )
    expected |= names_of(trained, trained.get_output_embeddings())
    assert changed_names(trained, base) == expected
    assert not names_of(trained, vision_tower(trained)) & changed_names(trained, base)
    assert trained.is_activation_checkpointing
    # The export holds the whole trained model: loaded fresh and re-zipped, it answers exactly as the trained one.
    export = tmp_path / "run" / "export"
    assert json.loads((export / "visionzip.json").read_text())["model"] == "model"
    with pytest.raises(UserError, match="from_pretrained.*model"):
        load_projector(load_tiny(train_assets[0])[0], export)
    fresh = apply_visionzip(LlavaForConditionalGeneration.from_pretrained(export / "model"))
    _, processor = load_tiny(train_assets[0])
    apply_visionzip(base, processor=processor, dominant=6, contextual=2)
    image = Image.new("RGB", (56, 56), (200, 40, 40))
    inputs = processor(images=image, text="USER: <image>\nWhat colour is it? ASSISTANT:", return_tensors="pt")
    trained.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        torch.testing.assert_close(fresh(**inputs).logits, expected)
        assert not torch.allclose(base(**inputs).logits, expected, atol=1e-4)


def test_lora_mode_wraps_only_llm_linears_and_trains_lora_plus_projector(train_assets, tmp_path):
    out = tmp_path / "run"
    trained = run(
        train_assets,
        out,
        "train.mode=lora",
        "train.max_steps=3",
        "train.lora_r=4",
        "train.lora_alpha=8",
        "train.projector_lr=5e-3",
        "train.activation_checkpointing=true",
    )
    base, _ = load_tiny(train_assets[0])
    lora = {name for name, _ in trained.named_parameters() if ".lora_" in name}
    llm_prefix = next(n for n, m in trained.named_modules() if m is language_model(trained))
    assert lora and all(name.startswith(llm_prefix + ".") for name in lora)  # the vision q/v are not wrapped
    lora_linears = {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n in lora}
    assert lora_linears == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = {name for name, p in trained.named_parameters() if p.requires_grad}
    assert trainable == lora | names_of(trained, projector_modules(trained)["multi_modal_projector"])
    assert changed_names(trained, base) == {
        n for n in names_of(trained, projector_modules(trained)["multi_modal_projector"])
    }
    lora_b = [p for n, p in trained.named_parameters() if ".lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: every one moved
    lrs = records(out, "train")[1]["lr_groups"]
    assert len(set(lrs)) == 2  # LoRA at train.lr, projector at train.projector_lr


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(train_assets, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"not finite\) at step 2 of 3.*step-000001"):
        run(train_assets, out, "train.lr=1e30", "train.max_grad_norm=0", "train.save_every=1")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000001"
    saved = load_file(out / "checkpoints" / "step-000001" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (out / "export").exists()


def test_resume_continues_the_same_run(train_assets, tmp_path, capsys):
    """A run stopped after its step-2 checkpoint and started again ends with the uninterrupted run's projector."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ("train.max_steps=4", "train.save_every=2", "train.eval_every=2")
    run(train_assets, whole, *args)
    run(train_assets, cut, *args, "train.keep_checkpoints=0")
    # Pretend the process died right after writing step 2: later files are what a kill would have left unwritten.
    import shutil

    shutil.rmtree(cut / "checkpoints" / "step-000004")
    shutil.rmtree(cut / "export")
    (cut / "checkpoints" / "latest").write_text("step-000002\n")
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # a line cut short by the kill
    capsys.readouterr()
    run(train_assets, cut, *args)
    evals = records(cut, "eval")  # the summary spans the whole run, not only the resumed process
    assert f"held-out accuracy {evals[0]['accuracy']:.3f} (step 0) -> " in capsys.readouterr().out
    a = load_file(whole / "checkpoints" / "step-000004" / "trainable.safetensors")
    b = load_file(cut / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in records(whole, "train")] == [r["loss"] for r in records(cut, "train")]
    assert [r["step"] for r in records(cut, "train")] == [1, 2, 3, 4]  # the curve continues, no duplicates
    run(train_assets, whole, *args)  # a finished run started again: evaluates and exports again, nothing doubles
    for out in (whole, cut):
        assert [r["step"] for r in records(out, "train")] == [1, 2, 3, 4]
        assert [(r["step"], r["accuracy"]) for r in records(out, "eval")] == [
            (r["step"], r["accuracy"]) for r in records(tmp_path / "whole", "eval")
        ]
    assert [r["step"] for r in records(whole, "eval")] == [0, 2, 4]


def wandb_records(path: Path) -> list:
    """The ``wandb_internal_pb2.Record`` messages of an offline ``.wandb`` file: a LevelDB-style log (32 KiB blocks;
    records with a 7-byte header crc32/length/type, split FIRST/MIDDLE/LAST across blocks)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, found, pos, pending = path.read_bytes(), [], 7, b""  # 7: the ":W&B" file header
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            found.append(record)
    return found


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline ``.wandb`` file."""
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
        for record in wandb_records(path)
        if record.WhichOneof("record_type") == "history"
    ]


def test_a_run_stopped_by_a_user_error_still_finishes_its_wandb_run(train_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    with pytest.raises(UserError, match="not finite"):
        run(train_assets, out, "logging.wandb=true", "train.lr=1e30", "train.max_grad_norm=0", "train.save_every=1")
    (file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    exits = [r.exit.exit_code for r in wandb_records(file) if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]  # closed, and marked failed
    assert [r["_step"] for r in wandb_history(file) if "train/loss" in r] == [1]


def test_wandb_offline_run_holds_the_logged_loss(train_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "run"
    run(train_assets, out, "logging.wandb=true", "train.max_steps=2")
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = wandb_history(files[0])
    logged = {row["_step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in records(out, "train")})
    accuracy = [row["eval/accuracy"] for row in history if "eval/accuracy" in row]
    assert accuracy == pytest.approx([r["accuracy"] for r in records(out, "eval")])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=0.1", "unknown config key 'train.lrr'"),
        ("train.lr=fast", "'train.lr' in override 'train.lr=fast' expects a number"),
        ("data.path=/nonexistent/train.json", "data.path: the data file /nonexistent/train.json does not exist"),
        ("data.image_folder=/nonexistent/images", "data.image_folder: the image folder /nonexistent/images does"),
        ("model.name_or_path=/nonexistent/model", "model.name_or_path='/nonexistent/model': no such directory"),
        ("train.projector_modules=merger", "has no projector subset 'merger'; choose one of all"),
        ("visionzip.dominant=40", "visionzip.dominant=40, visionzip.contextual=2"),
        ("visionzip.token_order=grid", "token_order='grid' is not available for LlavaForConditionalGeneration"),
        ("model.tiny.family=qwen", "'model.tiny.family' in override 'model.tiny.family=qwen' expects one of"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_run_dir(train_assets, tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert cli(["train", str(DEMO), *train_args(train_assets, out), override]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert not out.exists()


def test_help_lists_config_keys(capsys):
    assert cli(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "train.projector_lr" in out and "visionzip.dominant" in out


@pytest.mark.slow  # a few Python start-ups (install probe, checks): slow-ish, single process
def test_train_sh_rejects_bad_input_before_launching(train_assets, tmp_path):
    import subprocess

    out = tmp_path / "run"
    root = DEMO.parents[2]
    done = subprocess.run(
        ["bash", str(root / "train.sh"), str(DEMO), *train_args(train_assets, out), "data.path=/nonexistent.json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "data.path: the data file /nonexistent.json does not exist" in done.stderr
    assert "Traceback" not in done.stderr and "torchrun" not in done.stderr.lower()
    assert not out.exists()
