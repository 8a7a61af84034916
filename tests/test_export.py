"""Export and load_projector: round trip, file formats, fingerprint, refusals, the `export` CLI, ZeRO-3 gathering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import visionzip_tune as vzt
from visionzip_tune.__main__ import main as cli
from visionzip_tune.errors import UserError
from visionzip_tune.export import export_projector, load_projector, read_export, seal, weights_fingerprint
from visionzip_tune.files import file_sha256
from visionzip_tune.demo.tiny import TinySpec, build_tiny_with_processor, save_tiny

from conftest import load_tiny, perturb_projector

REPO = Path(__file__).resolve().parents[1]


def image_inputs(processor, color=(200, 40, 40)):
    image = Image.new("RGB", (224, 224), color)
    return processor(images=image, text="USER: <image>\nWhat colour is it? ASSISTANT:", return_tensors="pt")


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint


def test_fingerprint_same_weights_same_value_any_wrapper_or_dtype(tiny_clip_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    first, _ = load_tiny(tiny_clip_dir)
    reference = weights_fingerprint(first)
    assert reference.startswith("v1:") and len(reference) == 3 + 32
    assert weights_fingerprint(load_tiny(tiny_clip_dir)[0]) == reference
    # bf16 rounding of the sampled values makes a bf16 load of an fp32 checkpoint fingerprint the same.
    bf16 = LlavaForConditionalGeneration.from_pretrained(tiny_clip_dir, dtype=torch.bfloat16)
    assert weights_fingerprint(bf16) == reference
    # The projector is what gets trained: it is not part of the base fingerprint.
    perturb_projector(first)
    assert weights_fingerprint(first) == reference
    # LoRA on the language model renames its weights (base_layer) and adds lora_* tensors: normalised away.
    lora = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    assert weights_fingerprint(get_peft_model(first, lora)) == reference


@pytest.mark.parametrize(
    "where",
    [
        "model.language_model.embed_tokens.weight",
        "model.language_model.layers.0.mlp.up_proj.weight",
        "model.vision_tower.encoder.layers.3.self_attn.k_proj.weight",
        "lm_head.weight",
    ],
)
def test_fingerprint_changes_with_sampled_weights(tiny_clip_dir, where):
    model, _ = load_tiny(tiny_clip_dir)
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.get_parameter(where).add_(1e-2)
    assert weights_fingerprint(model) != before


def test_fingerprint_differs_between_random_bases():
    assert weights_fingerprint(build_tiny_with_processor(TinySpec(seed=0))[0]) != weights_fingerprint(
        build_tiny_with_processor(TinySpec(seed=1))[0]
    )


def _deterministic_llava():
    """A small LLaVA whose every weight is a fixed function of its name's rank: no RNG, no tokenizer training."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=63))
    with torch.no_grad():
        for k, (_, param) in enumerate(sorted(model.named_parameters())):
            param.copy_(torch.sin(torch.arange(param.numel(), dtype=torch.float32) * 0.37 + k).reshape(param.shape))
    return model


def test_llava_fingerprint_value_is_stable():
    # Pinned: existing LLaVA exports record this algorithm's value; a change here would refuse them all.
    assert weights_fingerprint(_deterministic_llava()) == "v1:a391a90dfe5c506b88f15d48b12befa3"


@pytest.mark.parametrize(
    "where",
    ["model.video_tower.encoder.layers.0.mlp.fc1.weight", "model.image_tower.embeddings.patch_embedding.weight"],
)
def test_video_llava_fingerprint_covers_both_towers(where):
    from tiny_families import build_tiny_video_llava

    model, _ = build_tiny_video_llava()
    before = weights_fingerprint(model)
    assert weights_fingerprint(build_tiny_video_llava()[0]) == before
    with torch.no_grad():
        model.get_parameter(where).add_(1e-2)
    assert weights_fingerprint(model) != before


# ---------------------------------------------------------------------------------------------------------------
# Export files and round trip


def test_round_trip_gives_the_trained_models_logits(tiny_clip_export, tiny_clip_dir):
    trained, processor, _, out = tiny_clip_export
    fresh, fresh_processor = load_tiny(tiny_clip_dir)
    assert load_projector(fresh, out, processor=fresh_processor) is fresh
    inputs = image_inputs(fresh_processor)
    assert int((inputs.input_ids == fresh.config.image_token_index).sum()) == 64
    with torch.no_grad():
        expected = trained(**image_inputs(processor)).logits
        assert torch.equal(fresh(**inputs).logits, expected)
    assert fresh.config.visionzip == {"dominant": 54, "contextual": 10, "eager": False}
    # Sanity: without load_projector the fresh model answers differently (the test would catch a no-op load).
    stock, _ = load_tiny(tiny_clip_dir)
    vzt.apply_visionzip(stock, 54, 10)
    with torch.no_grad():
        assert not torch.allclose(stock(**inputs).logits, expected)


def test_round_trip_with_a_siglip_tower(tiny_siglip, tiny_siglip_dir, tmp_path):
    trained, _ = tiny_siglip
    vzt.apply_visionzip(trained, 40, 8)
    perturb_projector(trained)
    out = export_projector(trained, tmp_path / "export", metadata={"base_model": str(tiny_siglip_dir)})
    fresh, processor = load_tiny(tiny_siglip_dir)
    load_projector(fresh, out, processor=processor)
    inputs = image_inputs(processor)
    assert int((inputs.input_ids == fresh.config.image_token_index).sum()) == 48
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, trained(**inputs).logits)


def test_projector_files_hold_the_same_tensors_under_both_namings(tiny_clip_export):
    _, _, tensors, out = tiny_clip_export
    hf = load_file(out / "projector.safetensors")
    original = torch.load(out / "mm_projector.bin", weights_only=True)
    mapping = {"linear_1": "model.mm_projector.0", "linear_2": "model.mm_projector.2"}
    assert set(hf) == {f"multi_modal_projector.{name}" for name in tensors}
    assert set(original) == {f"{mapping[n.split('.')[0]]}.{n.split('.')[1]}" for n in tensors}
    for name, tensor in tensors.items():
        layer, kind = name.split(".")
        assert torch.equal(hf[f"multi_modal_projector.{name}"], tensor)
        assert torch.equal(original[f"{mapping[layer]}.{kind}"], tensor)


def test_visionzip_json_records_budget_base_and_provenance(tiny_clip_export, tiny_clip_dir):
    model, _, tensors, out = tiny_clip_export
    record = json.loads((out / "visionzip.json").read_text())
    assert record["format_version"] == 2
    assert record["base_model"] == str(tiny_clip_dir)
    assert record["base_fingerprint"] == weights_fingerprint(load_tiny(tiny_clip_dir)[0])
    assert record["family"] == "llava"
    assert (record["method"], record["dominant"], record["contextual"], record["eager"]) == ("visionzip", 54, 10, False)
    assert record["tokens_per_image"] == 64
    assert record["layer"] == model.config.vision_feature_layer == -2
    assert record["token_order"] == "flat"
    assert record["step"] == 7
    assert record["recipe"] is None and record["data_fingerprint"] is None
    assert record["projector"] == {f"multi_modal_projector.{n}": list(t.shape) for n, t in tensors.items()}
    assert set(record["files"]) == {"projector.safetensors", "mm_projector.bin"}
    assert record["files"]["projector.safetensors"] == file_sha256(out / "projector.safetensors")
    assert read_export(out) == record


def test_export_replaces_the_previous_export_atomically(tiny_clip_export, tmp_path):
    model, _, _, out = tiny_clip_export
    newer = perturb_projector(model, seed=2)
    export_projector(model, out, metadata={"base_model": "somewhere", "step": 8})
    assert read_export(out)["step"] == 8
    assert torch.equal(
        load_file(out / "projector.safetensors")["multi_modal_projector.linear_1.weight"], newer["linear_1.weight"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp or old directories left behind


def test_failed_export_keeps_the_previous_one(tiny_clip_export, tmp_path, monkeypatch):
    model, _, tensors, out = tiny_clip_export
    perturb_projector(model, seed=2)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)  # fails after projector.safetensors is already written
    with pytest.raises(OSError, match="No space left"):
        export_projector(model, out, metadata={"base_model": "somewhere", "step": 8})
    assert read_export(out)["step"] == 7
    assert torch.equal(
        load_file(out / "projector.safetensors")["multi_modal_projector.linear_1.weight"], tensors["linear_1.weight"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_rejects_metadata_that_contradicts_the_model(tiny_clip_export, tmp_path):
    model, _, _, _ = tiny_clip_export
    with pytest.raises(ValueError, match="contradicts"):
        export_projector(model, tmp_path / "x", metadata={"base_model": "m", "dominant": 100})
    with pytest.raises(ValueError, match="base_model"):
        export_projector(model, tmp_path / "x", metadata={})
    assert not (tmp_path / "x").exists()


def test_export_without_visionzip_loads_back_stock(tiny_clip, tiny_clip_dir, tmp_path):
    model, _ = tiny_clip
    perturb_projector(model)
    out = export_projector(model, tmp_path / "export", metadata={"base_model": str(tiny_clip_dir)})
    assert read_export(out)["dominant"] is None and read_export(out)["tokens_per_image"] == 256
    fresh, processor = load_tiny(tiny_clip_dir)
    vzt.apply_visionzip(fresh, 54, 10, processor=processor)
    load_projector(fresh, out, processor=processor)
    assert not hasattr(fresh.config, "visionzip")
    assert int((image_inputs(processor).input_ids == fresh.config.image_token_index).sum()) == 256


# ---------------------------------------------------------------------------------------------------------------
# Refusals


def test_fingerprint_mismatch_names_both_fingerprints_and_leaves_the_model_alone(tiny_clip_export, tmp_path):
    _, _, _, out = tiny_clip_export
    other_dir = save_tiny(tmp_path / "other", TinySpec(seed=1))
    other, processor = load_tiny(other_dir)
    before = {n: p.clone() for n, p in other.model.multi_modal_projector.named_parameters()}
    record = read_export(out)
    with pytest.raises(UserError) as err:
        load_projector(other, out, processor=processor)
    message = str(err.value)
    for part in (record["base_fingerprint"], weights_fingerprint(other), str(out), record["base_model"]):
        assert part in message
    assert all(torch.equal(p, before[n]) for n, p in other.model.multi_modal_projector.named_parameters())
    assert not hasattr(other.config, "visionzip")
    # The override loads anyway (same geometry, other weights).
    load_projector(other, out, processor=processor, check_fingerprint=False)
    assert torch.equal(other.model.multi_modal_projector.linear_1.weight, tiny_clip_export[2]["linear_1.weight"])


def test_shape_mismatch_lists_the_tensors(tiny_clip_export, tmp_path):
    _, _, _, out = tiny_clip_export
    narrow, _ = build_tiny_with_processor(TinySpec(text_hidden=32))
    with pytest.raises(UserError) as err:
        load_projector(narrow, out, check_fingerprint=False)
    message = str(err.value)
    assert "multi_modal_projector.linear_1.weight is [64, 64] but the model has [32, 64]" in message
    assert "multi_modal_projector.linear_2.bias is [64] but the model has [32]" in message


def test_tampered_projector_file_is_refused(tiny_clip_export, tiny_clip_dir):
    _, _, tensors, out = tiny_clip_export
    hf = load_file(out / "projector.safetensors")
    del hf["multi_modal_projector.linear_2.bias"]
    hf["multi_modal_projector.extra"] = torch.zeros(3)
    save_file(hf, out / "projector.safetensors")
    model = load_tiny(tiny_clip_dir)[0]
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(UserError, match="projector.safetensors missing or changed since it was written"):
        load_projector(model, out)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before touching it


def test_a_recorded_budget_the_model_cannot_take_is_a_clear_error(tiny_clip_export, tiny_clip_dir):
    """An export whose budget does not fit the model (sealed as written, e.g. by a newer version) is refused in
    one paragraph before the model is touched, not with a raw ValueError."""
    _, _, _, out = tiny_clip_export
    record = read_export(out)
    (out / "visionzip.json").write_text(json.dumps(seal({**record, "dominant": 300}, out)))
    model = load_tiny(tiny_clip_dir)[0]
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(UserError, match=r"records a budget this model cannot take: .*dominant=300, contextual=10"):
        load_projector(model, out)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _edit_record(out, **changes):
    record = json.loads((out / "visionzip.json").read_text())
    (out / "visionzip.json").write_text(json.dumps({**record, **changes}))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda out: out.rename(out.with_name("gone")), "does not exist"),
        (lambda out: (out / "visionzip.json").unlink(), "visionzip.json is missing"),
        (lambda out: (out / "visionzip.json").write_text("{not json"), "is not valid JSON"),
        (lambda out: (out / "visionzip.json").write_text('{"format_version": 99}'), "format_version 99"),
        (lambda out: (out / "visionzip.json").write_text('{"format_version": 2}'), "lacks the keys"),
        (lambda out: (out / "projector.safetensors").unlink(), "projector.safetensors missing or changed"),
        (lambda out: (out / "projector.safetensors").write_bytes(b"\x00" * 20), "projector.safetensors missing or"),
        (lambda out: (out / "mm_projector.bin").write_bytes(b"\x00" * 20), "mm_projector.bin missing or changed"),
        (lambda out: _edit_record(out, dominant=30), "was edited after the export"),
    ],
    ids=["no-dir", "no-json", "bad-json", "new-format", "keys", "no-weights", "bad-weights", "bad-bin", "edited"],
)
def test_broken_export_is_a_clear_user_error(tiny_clip_export, tiny_clip_dir, damage, expected):
    _, _, _, out = tiny_clip_export
    damage(out)
    with pytest.raises(UserError, match=expected) as err:
        load_projector(load_tiny(tiny_clip_dir)[0], out)
    assert str(out) in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# `python -m visionzip_tune export --run DIR`


def make_run(
    run: Path,
    model_dir: Path,
    tensors: dict[str, torch.Tensor],
    step: int = 3,
    mode: str = "projector",
    prefix: str = "model.multi_modal_projector.",
    overrides: tuple[str, ...] = (),
) -> Path:
    """A run directory laid out as training writes it (config.yaml, checkpoints/latest, trainable.safetensors);
    ``overrides`` (``key=value``) come after the defaults here."""
    from visionzip_tune.training.config import load_config, to_yaml

    cfg = load_config(
        overrides=[
            f"model.name_or_path={model_dir}",
            f"output.dir={run}",
            "visionzip.dominant=54",
            "visionzip.contextual=10",
            f"train.mode={mode}",
            "train.lora_r=4",
            "train.lora_alpha=8",
            *overrides,
        ]
    )
    ckpt = run / "checkpoints" / f"step-{step:06d}"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    save_file({prefix + n: t for n, t in tensors.items()}, ckpt / "trainable.safetensors")
    (ckpt / "state.json").write_text(json.dumps({"step": step, "data_fingerprint": "sha256:abc"}))
    (run / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return run


def test_export_cli_exports_the_latest_checkpoint(tiny_clip_dir, tmp_path, capsys):
    trained, _ = load_tiny(tiny_clip_dir)
    tensors = perturb_projector(trained)
    run = make_run(tmp_path / "run", tiny_clip_dir, tensors)
    assert cli(["export", "--run", str(run)]) == 0
    out = run / "export"
    assert capsys.readouterr().out.strip() == str(out)
    record = read_export(out)
    assert (record["dominant"], record["contextual"], record["step"]) == (54, 10, 3)
    assert record["data_fingerprint"] == "sha256:abc"
    assert record["base_model"] == str(Path(tiny_clip_dir).resolve())
    assert record["recipe"]["config"]["visionzip"]["dominant"] == 54
    fresh, processor = load_tiny(tiny_clip_dir)
    load_projector(fresh, out, processor=processor)
    assert all(torch.equal(p, tensors[n]) for n, p in fresh.model.multi_modal_projector.named_parameters())
    assert fresh.config.visionzip["dominant"] == 54


def test_export_cli_keeps_the_runs_token_order(tmp_path):
    from transformers import AutoModelForImageTextToText

    from visionzip_tune.demo.tiny import TinySpec, save_tiny

    spec = TinySpec(family="llava_next", image_size=56, vision_hidden=32, vision_layers=2, text_hidden=32)
    base = save_tiny(tmp_path / "next", spec)
    tensors = perturb_projector(AutoModelForImageTextToText.from_pretrained(base))
    budget = ("visionzip.dominant=6", "visionzip.contextual=3", "visionzip.token_order=grid")
    run = make_run(tmp_path / "run", base, tensors, overrides=budget)
    assert cli(["export", "--run", str(run)]) == 0
    record = read_export(run / "export")
    assert (record["family"], record["dominant"], record["token_order"]) == ("llava_next", 6, "grid")
    fresh = AutoModelForImageTextToText.from_pretrained(base)
    load_projector(fresh, run / "export")
    assert fresh.config.visionzip["token_order"] == "grid"


def test_export_cli_of_a_run_without_visionzip_on_a_zipped_base(tiny_clip_dir, tmp_path):
    zipped, _ = load_tiny(tiny_clip_dir)
    vzt.apply_visionzip(zipped, 54, 10)
    zipped.save_pretrained(tmp_path / "zipped-base")  # e.g. a full run's export/model: its config records a budget
    run = make_run(
        tmp_path / "run", tmp_path / "zipped-base", perturb_projector(zipped), overrides=("visionzip.enabled=false",)
    )
    assert cli(["export", "--run", str(run)]) == 0
    assert read_export(run / "export")["dominant"] is None  # the run trained on every token


def _cli_error(argv, capsys) -> str:
    capsys.readouterr()  # drop earlier output (progress bars of loads done by the test itself)
    assert cli(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("error: ") == 1 and "Traceback" not in captured.err
    assert "\n\n" not in captured.err.strip()  # one paragraph
    return " ".join(captured.err.split())


def test_export_cli_errors(tiny_clip_dir, tmp_path, capsys):
    trained, _ = load_tiny(tiny_clip_dir)
    tensors = perturb_projector(trained)
    assert "is not a run directory" in _cli_error(["export", "--run", str(tmp_path / "nope")], capsys)

    run = make_run(tmp_path / "run", tiny_clip_dir, tensors)
    assert "step-000009 has no trainable.safetensors" in _cli_error(
        ["export", "--run", str(run), "--checkpoint", "step-000009"], capsys
    )
    (run / "checkpoints" / "latest").unlink()
    assert "has no checkpoint yet" in _cli_error(["export", "--run", str(run)], capsys)

    wide = make_run(tmp_path / "wide", tiny_clip_dir, {**tensors, "linear_2.bias": torch.zeros(65)})
    message = _cli_error(["export", "--run", str(wide)], capsys)
    assert "linear_2.bias is [65] but the model has [64]" in message
    assert not (wide / "export").exists()

    missing = make_run(tmp_path / "missing", tmp_path / "no-model", tensors)
    assert "cannot load the base model" in _cli_error(["export", "--run", str(missing)], capsys)


# ---------------------------------------------------------------------------------------------------------------
# LoRA runs: the adapter travels with the projector; full runs are refused


def lora_model(model_dir: Path, seed: int = 5):
    """A zipped tiny model wrapped for ``train.mode=lora`` exactly as training wraps it, LoRA and projector
    perturbed as if trained; returns the peft model."""
    from visionzip_tune.training.config import TrainConfig
    from visionzip_tune.training.build import prepare_trainable

    model, _ = load_tiny(model_dir)
    vzt.apply_visionzip(model, 54, 10)
    wrapped, _ = prepare_trainable(model, TrainConfig(mode="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if param.requires_grad:  # lora_B starts at zero: without this the adapter would be a no-op
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return wrapped.eval()


def test_lora_export_round_trip(tiny_clip_dir, tmp_path):
    wrapped = lora_model(tiny_clip_dir)
    fingerprint = weights_fingerprint(wrapped)
    out = export_projector(wrapped, tmp_path / "export", metadata={"base_model": str(tiny_clip_dir), "mode": "lora"})
    assert read_export(out)["adapter"] == "adapter" and read_export(out)["base_fingerprint"] == fingerprint
    fresh, processor = load_tiny(tiny_clip_dir)
    assert load_projector(fresh, out, processor=processor) is fresh
    assert not any("lora" in name for name, _ in fresh.named_parameters())  # merged into the base weights
    inputs = image_inputs(processor)
    with torch.no_grad():
        expected = wrapped(**inputs).logits
        torch.testing.assert_close(fresh(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
        projector_only, _ = load_tiny(tiny_clip_dir)
        record = read_export(out)
        del record["adapter"]  # an export of the same projector tuned without LoRA
        (out / "visionzip.json").write_text(json.dumps(seal(record, out)))
        load_projector(projector_only, out)  # same projector, no adapter: the LoRA must have mattered
        assert not torch.allclose(projector_only(**inputs).logits, expected, rtol=1e-4, atol=1e-5)


def test_export_cli_exports_a_lora_run(tiny_clip_dir, tmp_path, capsys):
    wrapped = lora_model(tiny_clip_dir)
    tensors = {name: p.detach().clone() for name, p in wrapped.named_parameters() if p.requires_grad}
    run = make_run(tmp_path / "run", tiny_clip_dir, tensors, mode="lora", prefix="")
    assert cli(["export", "--run", str(run)]) == 0
    record = read_export(run / "export")
    assert record["mode"] == "lora" and record["adapter"] == "adapter"
    fresh, processor = load_tiny(tiny_clip_dir)
    load_projector(fresh, run / "export", processor=processor)
    inputs = image_inputs(processor)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, wrapped(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_export_cli_exports_a_full_run_as_a_whole_model(tiny_clip_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from visionzip_tune.training.config import load_config
    from visionzip_tune.families import language_model
    from visionzip_tune.data.processing import load_processing
    from visionzip_tune.training.build import prepare_trainable

    trained, processor = load_tiny(tiny_clip_dir)
    vzt.apply_visionzip(trained, 54, 10, processor=processor)
    perturb_projector(trained)
    with torch.no_grad():
        for param in language_model(trained).layers[0].parameters():
            param.add_(0.05 * torch.randn_like(param))
    prepare_trainable(trained, load_config(overrides=["train.mode=full"]).train)
    tensors = {name: p.detach().clone() for name, p in trained.named_parameters() if p.requires_grad}
    run = make_run(tmp_path / "run", tiny_clip_dir, tensors, mode="full", prefix="")
    assert cli(["export", "--run", str(run)]) == 0
    record = read_export(run / "export")
    assert (record["mode"], record["model"]) == ("full", "model")
    tokenizer, image_processor, chat_template = load_processing(str(run / "export" / "model"))
    assert tokenizer.get_vocab() == processor.tokenizer.get_vocab() and chat_template == processor.chat_template
    assert image_processor.to_dict() == processor.image_processor.to_dict()
    with pytest.raises(UserError, match=r"from_pretrained.*export.model.*apply_visionzip"):
        load_projector(load_tiny(tiny_clip_dir)[0], run / "export")
    fresh = vzt.apply_visionzip(LlavaForConditionalGeneration.from_pretrained(run / "export" / "model"))
    inputs = image_inputs(processor)
    with torch.no_grad():
        expected = trained(**inputs).logits
        torch.testing.assert_close(fresh(**inputs).logits, expected)
        # Sanity: the base model under the same budget answers differently (the test would catch a base-model save).
        stock, _ = load_tiny(tiny_clip_dir)
        vzt.apply_visionzip(stock, 54, 10)
        assert not torch.allclose(stock(**inputs).logits, expected, atol=1e-4)


def test_full_export_saves_the_processing_next_to_the_model(tmp_path):
    from transformers import AutoModelForImageTextToText, VideoLlavaImageProcessor

    from tiny_families import build_tiny_video_llava
    from visionzip_tune.data.processing import Processing, load_processing
    from visionzip_tune.demo.tiny import CHAT_TEMPLATE

    model, tokenizer = build_tiny_video_llava()
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = VideoLlavaImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    vzt.apply_visionzip(model, 6, 3)
    metadata = {"base_model": "tiny-video-llava", "mode": "full"}
    processing = Processing(tokenizer, image_processor, tokenizer.chat_template)
    out = export_projector(model, tmp_path / "export", metadata=metadata, processing=processing)
    loaded_tokenizer, loaded_image_processor, chat_template = load_processing(str(out / "model"))
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab() and chat_template == CHAT_TEMPLATE
    assert loaded_image_processor.to_dict() == image_processor.to_dict()
    assert type(AutoModelForImageTextToText.from_pretrained(out / "model")) is type(model)
    # A projector-mode export has no model directory to put them in: the processing is not written.
    projector_only = export_projector(
        model, tmp_path / "projector", metadata={"base_model": "tiny"}, processing=processing
    )
    assert not (projector_only / "model").exists()


# ---------------------------------------------------------------------------------------------------------------
# ZeRO-3: 2 processes, projector partitioned; export gathers it collectively, load_projector scatters it back

ZERO3_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import deepspeed, torch
    from visionzip_tune.export import export_projector, load_projector, weights_fingerprint
    from visionzip_tune.families import apply_visionzip
    from visionzip_tune.demo.tiny import TinySpec, build_tiny_with_processor
    from visionzip_tune.training.ops import skip_shared_memory_comm

    out = sys.argv[1]
    skip_shared_memory_comm()  # as the package's runs do: no rank builds an op nobody uses
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model, _ = build_tiny_with_processor(TinySpec())                     # same seed on every rank
    apply_visionzip(model, 54, 10)
    fingerprint = weights_fingerprint(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    expected = {n: p.detach().clone() for n, p in model.model.multi_modal_projector.named_parameters()}
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    params = list(model.model.multi_modal_projector.parameters())
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params), config=config)
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)
    same_fingerprint = weights_fingerprint(engine) == fingerprint   # gathers the sampled tensors
    export_projector(engine, out, metadata={"base_model": "tiny", "base_fingerprint": fingerprint})
    # Scramble the partitioned projector, then load the export back into it.
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
        for p in params:
            p.zero_()
    load_projector(engine, out)
    with deepspeed.zero.GatheredParameters(params):
        projector = model.model.multi_modal_projector
        restored = all(torch.equal(p.detach(), expected[n]) for n, p in projector.named_parameters())
    if rank == 0:
        torch.save(expected, out + ".expected.pt")
        json.dump({"partitioned": partitioned, "same_fingerprint": same_fingerprint, "restored": restored},
                  open(out + ".result.json", "w"))
    # Leave together: a rank that exits while the other still talks to it aborts in gloo's teardown.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    """
)


def _torchrun2(source: str, tmp_path: Path, out: Path) -> None:
    """Run ``source`` as a 2-process torchrun job (gloo, DeepSpeed on CPU) with ``out`` as its argument."""
    script = tmp_path / "zero3_export.py"
    script.write_text(source)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_export_under_zero3_gathers_full_tensors(tmp_path):
    out = tmp_path / "export"
    _torchrun2(ZERO3_SCRIPT, tmp_path, out)
    result = json.loads(Path(f"{out}.result.json").read_text())
    assert result == {"partitioned": True, "same_fingerprint": True, "restored": True}
    expected = torch.load(f"{out}.expected.pt")
    hf = load_file(out / "projector.safetensors")
    for name, tensor in expected.items():
        assert hf[f"multi_modal_projector.{name}"].shape == tensor.shape  # full shapes, not ZeRO-3's (0,)
        assert torch.equal(hf[f"multi_modal_projector.{name}"], tensor)


ZERO3_FULL_SCRIPT = textwrap.dedent(
    """
    import sys
    import deepspeed, torch
    from visionzip_tune.export import export_projector
    from visionzip_tune.families import apply_visionzip
    from visionzip_tune.demo.tiny import TinySpec, build_tiny_with_processor
    from visionzip_tune.training.ops import skip_shared_memory_comm

    out = sys.argv[1]
    skip_shared_memory_comm()  # as the package's runs do: no rank builds an op nobody uses
    deepspeed.init_distributed(dist_backend="gloo")
    model, _ = build_tiny_with_processor(TinySpec())                     # same seed on every rank
    apply_visionzip(model, 54, 10)
    if torch.distributed.get_rank() == 0:
        torch.save(model.state_dict(), out + ".expected.pt")
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    assert all(p.numel() == 0 for p in model.parameters())     # every parameter partitioned
    export_projector(engine, out, metadata={"base_model": "tiny", "base_fingerprint": "v1:0", "mode": "full"})
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    """
)


@pytest.mark.slow
def test_full_export_under_zero3_saves_the_whole_gathered_model(tmp_path):
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "export"
    _torchrun2(ZERO3_FULL_SCRIPT, tmp_path, out)
    saved = LlavaForConditionalGeneration.from_pretrained(out / "model")
    assert saved.config.visionzip == {"dominant": 54, "contextual": 10, "eager": False}
    expected = torch.load(f"{out}.expected.pt")
    state = saved.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name  # full tensors, not ZeRO-3's empty partitions


def test_an_export_records_its_compressor_and_is_refused_under_another(tiny_clip, tiny_clip_dir, tmp_path):
    model, processor = tiny_clip
    vzt.apply_compression(model, "vispruner", tokens=12, important_ratio=0.25, processor=processor)
    tensors = perturb_projector(model)
    out = export_projector(model, tmp_path / "export", metadata={"base_model": str(tiny_clip_dir)})
    record = json.loads((out / "visionzip.json").read_text())
    assert {k: record[k] for k in ("method", "tokens", "important_ratio", "eager", "tokens_per_image")} == {
        "method": "vispruner",
        "tokens": 12,
        "important_ratio": 0.25,
        "eager": False,
        "tokens_per_image": 12,
    }
    fresh, fresh_processor = load_tiny(tiny_clip_dir)
    load_projector(fresh, out, processor=fresh_processor)  # as tuned: its compressor and parameters
    assert fresh.config.visionzip == model.config.visionzip
    assert all(torch.equal(p, tensors[n]) for n, p in fresh.model.multi_modal_projector.named_parameters())
    other = {"method": "divprune", "tokens": 12}
    with pytest.raises(UserError, match=r"was tuned with vispruner:12\(important_ratio=0.25\) .* the budget asked for"):
        load_projector(load_tiny(tiny_clip_dir)[0], out, budget=other)
    for budget in ({"dominant": 10, "contextual": 2}, None):
        with pytest.raises(UserError, match="was tuned with vispruner"):
            load_projector(load_tiny(tiny_clip_dir)[0], out, budget=budget or {"method": "random", "tokens": 4})
    compared = load_projector(load_tiny(tiny_clip_dir)[0], out, budget=other, other_compressor=True)
    assert compared.config.visionzip["method"] == "divprune"
    same = load_projector(load_tiny(tiny_clip_dir)[0], out, budget={"method": "vispruner", "tokens": 8})
    assert same.config.visionzip["tokens"] == 8  # the compressor it was tuned with, another budget: allowed
