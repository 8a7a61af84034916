"""Mini-Gemini through the toolkit: training (projector mode with MGM's stage-1 set or the MLP alone, full, LoRA;
ZeRO-3 under torchrun), the export in HF and MGM names read back as MGM's own loader reads it, ``load_projector``,
``generate`` and ``data preview`` -- on tiny random models and the demo data."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO, ROOT, greedy_answer, records, text_only_samples
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForImageTextToText

from visionzip_tune.training import build
from visionzip_tune.__main__ import main as cli
from visionzip_tune.training.config import load_config
from visionzip_tune.data import DataConfig, SupervisedDataset, load_samples
from visionzip_tune.demo.dataset import make_demo_dataset
from visionzip_tune.distributed import init_distributed
from visionzip_tune.export import export_projector, load_projector
from visionzip_tune.families import apply_visionzip, projector_parameters, unwrap_peft
from visionzip_tune.models.mini_gemini.modeling_mini_gemini import MINING_MODULES
from visionzip_tune.data.processing import load_processing
from visionzip_tune.demo.tiny import TinySpec, save_tiny
from visionzip_tune.training.loop import train

K = 6 + 2  # VisionZip tokens per view in these runs
# MGM's projector set under its own names, as MGM-7B's stage-1 mm_projector.bin holds it.
MGM_NAMES = {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")} | {
    f"model.{module}.{i}.{p}" for module in MINING_MODULES for i in (0, 1) for p in ("weight", "bias")
}


def mgm_args(root: Path, out: Path, *overrides: str) -> list[str]:
    """Overrides of the demo recipe for a short run of a tiny Mini-Gemini (56 px CLIP views: 16 patches + CLS; a
    64 px HR image, 4 x 4 HR vectors per token) on 24 demo samples."""
    return [
        f"model.name_or_path={root / 'mgm'}",
        "model.tiny.family=mini_gemini",
        "model.tiny.image_size=56",
        "model.tiny.vision_layers=2",
        f"data.path={root / 'demo' / 'train.json'}",
        f"data.image_folder={root / 'demo' / 'images'}",
        f"data.eval_path={root / 'demo' / 'eval.json'}",
        "data.demo_samples=24",
        "visionzip.dominant=6",
        "visionzip.contextual=2",
        "train.max_steps=3",
        "train.micro_batch_size=4",
        "train.save_every=0",
        "logging.progress_bar=false",
        f"output.dir={out}",
        *overrides,
    ]


def changed(trained: nn.Module, base: nn.Module) -> set[str]:
    """Top-level parts of the inner model (and lm_head) whose weights differ between the two models."""
    base_params = dict(base.named_parameters())
    parts = set()
    for name, param in unwrap_peft(trained).named_parameters():
        if ".lora_" in name:
            continue
        if not torch.equal(param.detach(), base_params[name.replace(".base_layer", "")].detach()):
            parts.add(name.split(".")[1] if name.startswith("model.") else name.split(".")[0])
    return parts


def mgm_loader_modules(export: Path, hidden: int, aux: int, text: int) -> nn.ModuleDict:
    """The projector set as MGM's own loader rebuilds it from an export (mgm/model/builder.py, mgm_arch.py,
    read there): ``mm_projector.bin`` loaded with strict=False into Sequential(Linear, GELU, Linear) under
    ``model.mm_projector.*``; each mining module Sequential(LayerNorm, Linear) re-created and loaded from the
    safetensors files that ``model.safetensors.index.json`` names, by the part of each key after its module name."""
    modules = nn.ModuleDict(
        {
            "mm_projector": nn.Sequential(nn.Linear(hidden, text), nn.GELU(), nn.Linear(text, text)),
            **{name: nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden)) for name in MINING_MODULES[:1]},
            **{name: nn.Sequential(nn.LayerNorm(aux), nn.Linear(aux, hidden)) for name in MINING_MODULES[1:]},
        }
    )
    bin_weights = torch.load(export / "mm_projector.bin", weights_only=True)
    projector = {k.split("mm_projector.")[1]: v for k, v in bin_weights.items() if "mm_projector." in k}
    modules["mm_projector"].load_state_dict(projector)
    index = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    weights = {}
    for shard in {file for key, file in index.items() if "vlm_uni" in key}:
        with safe_open(str(export / shard), framework="pt") as f:
            weights.update({key: f.get_tensor(key) for key in f.keys()})
    for name in MINING_MODULES:
        modules[name].load_state_dict({k.split(name + ".")[1]: v for k, v in weights.items() if name + "." in k})
    return modules


@pytest.mark.parametrize(
    "mode, extra, parts",
    [
        ("projector", (), {"multi_modal_projector", *MINING_MODULES}),
        ("mlp_only", ("train.projector_modules=mlp_only",), {"multi_modal_projector"}),
        ("full", ("train.mode=full",), {"multi_modal_projector", *MINING_MODULES, "language_model", "lm_head"}),
        (
            "lora",
            ("train.mode=lora", "train.lora_r=4", "train.lora_alpha=8"),
            {"multi_modal_projector", *MINING_MODULES, "language_model"},
        ),
    ],
)
def test_training_changes_what_the_mode_trains_and_exports_it(tmp_path, mode, extra, parts):
    out = tmp_path / "run"
    cfg = load_config(DEMO, mgm_args(tmp_path, out, *extra))
    trained = train(cfg, init_distributed(), recipe=str(DEMO))
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "mgm")
    if mode == "lora":  # the mining projections are nn.Linear too: LoRA's regex is rooted at the LLM
        wrapped = [name for name, _ in trained.named_modules() if name.endswith(".lora_A")]
        assert wrapped and all(".language_model." in name for name in wrapped)
        trained = copy.deepcopy(trained).merge_and_unload()  # LoRA changes the LLM once merged
    assert changed(trained, base) == parts  # both towers bit-identical in every mode
    steps = records(out, "train")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["vision_tokens"] == K * r["images"] for r in steps)  # placeholders = zipped features

    export = out / "export"
    hf = load_file(export / "projector.safetensors")
    assert hf.keys() == projector_parameters(base).keys()  # the whole set, whatever subset trained
    trained_params = projector_parameters(trained)
    assert all(torch.equal(hf[name], trained_params[name].detach()) for name in hf)
    record = json.loads((export / "visionzip.json").read_text())
    assert (record["family"], record["tokens_per_image"], record["mode"]) == ("mini_gemini", K, cfg.train.mode)
    if mode == "full":  # the whole trained model: generate and from_pretrained use it
        assert (export / "model" / "config.json").is_file()
        return
    if mode == "lora":
        adapter = json.loads((export / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == 4 and "language_model" in adapter["target_modules"]
    fresh = AutoModelForImageTextToText.from_pretrained(tmp_path / "mgm")
    load_projector(fresh, export)  # fingerprint (both towers + LLM), shapes, budget; LoRA merged
    assert fresh.config.visionzip["dominant"] == 6 and changed(fresh, trained) == set()


def test_export_in_mgm_names_loads_as_mgm_loads_it(tmp_path):
    """The MGM-named files of an export rebuild the same projector set when read the way MGM's loader reads them
    (mm_projector.bin for the MLP, the index and its safetensors for the mining modules)."""
    base_dir = save_tiny(tmp_path / "mgm", TinySpec(family="mini_gemini", image_size=56, vision_layers=2))
    model = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
    apply_visionzip(model, 6, 2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in projector_parameters(model).values():  # as training would change them
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    export = export_projector(model, tmp_path / "export", metadata={"base_model": str(base_dir)})
    assert set(torch.load(export / "mm_projector.bin", weights_only=True)) == MGM_NAMES
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == dict.fromkeys(sorted(MGM_NAMES), "mm_projector.safetensors")
    assert set(json.loads((export / "visionzip.json").read_text())["files"]) == {
        "projector.safetensors",
        "mm_projector.bin",
        "mm_projector.safetensors",
        "model.safetensors.index.json",
    }
    config = model.config
    rebuilt = mgm_loader_modules(
        export, config.vision_config.hidden_size, sum(config.aux_vision_config.hidden_sizes), 64
    )
    inner = model.model
    x = torch.randn(3, config.vision_config.hidden_size, generator=generator)
    hr = torch.randn(3, sum(config.aux_vision_config.hidden_sizes), generator=generator)
    with torch.no_grad():
        assert torch.equal(rebuilt["mm_projector"](x), inner.multi_modal_projector(x))
        assert torch.equal(rebuilt["vlm_uni_query_projector"](x), inner.vlm_uni_query_projector(x))
        for name in MINING_MODULES[1:]:
            assert torch.equal(rebuilt[name](hr), getattr(inner, name)(hr))


@pytest.mark.slow
@pytest.mark.parametrize("mode, port", [("projector", 29461), ("full", 29462)])
def test_zero3_two_processes_train_and_export(tmp_path, mode, port):
    """ZeRO-3 under torchrun (weights sharded at load by zero.Init): MGM's projector set (and in full mode the LLM)
    trains while a rank's micro-batch may hold only text (blank HR image through both towers), and the export
    gathers whole tensors (full mode: the whole model, towers untouched)."""
    demo = make_demo_dataset(tmp_path / "demo", n=24, seed=0, n_eval=4)
    samples = json.loads(demo.train.read_text())
    images = [s for s in samples if "image" in s][:3]
    text = text_only_samples(3)
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps([images[0], text[0], images[1], text[1], text[2], images[2]]))
    out = tmp_path / "run"
    args = mgm_args(
        tmp_path,
        out,
        f"data.path={data}",
        f"data.eval_path={demo.eval}",
        "deepspeed.zero_stage=3",
        "data.group_by_modality=false",
        "train.micro_batch_size=1",
        "train.save_every=3",
        f"train.mode={mode}",
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(port)]
    cmd += ["-m", "visionzip_tune", "train", str(DEMO), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[train] ZeRO-3: weights sharded across ranks at load" in done.stdout
    steps = records(out, "train")
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["vision_tokens"] == K * r["images"] for r in steps)
    assert sum(r["images"] for r in steps) == 3
    saved = load_file(out / "checkpoints" / "step-000003" / "trainable.safetensors")
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "mgm")
    projector = {f"model.{name}" for name in projector_parameters(base)}
    assert projector <= set(saved) and any(".language_model." in name for name in saved) == (mode == "full")
    exported = load_file(out / "export" / "projector.safetensors")
    mgm_named = torch.load(out / "export" / "mm_projector.bin", weights_only=True)
    assert set(mgm_named) == MGM_NAMES
    for name, tensor in exported.items():
        assert torch.equal(tensor, saved[f"model.{name}"])
        assert tensor.shape == projector_parameters(base)[name].shape  # whole, gathered
    assert torch.equal(mgm_named["model.vlm_uni_val_projector.1.weight"], exported["vlm_uni_val_projector.1.weight"])
    assert not torch.equal(exported["vlm_uni_val_projector.1.weight"], base.model.vlm_uni_val_projector[1].weight)
    if mode == "full":
        whole = AutoModelForImageTextToText.from_pretrained(out / "export" / "model")
        assert changed(whole, base) == {"multi_modal_projector", *MINING_MODULES, "language_model", "lm_head"}


# ----------------------------------------------------------------------------------------------------------------
# generate and data preview

QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def wide_image(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    pixels = torch.randint(0, 256, (70, 150, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(root / "wide.png")
    return root


@pytest.mark.parametrize("hd, views", [(False, 1), (True, 5)])
def test_generate_cli_answers_as_the_training_data_path(tmp_path, wide_image, capsys, hd, views):
    """A tiny MGM export (projector set changed as training would): the CLI builds the prompt, the HR pixels (padded
    to a square, at image_size_aux) and K placeholders per view as training does, and answers the same."""
    spec = TinySpec(family="mini_gemini", image_size=56, vision_layers=2, text_init_std=0.2, hd=hd)
    base = save_tiny(tmp_path / "base", spec)
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    apply_visionzip(model, 6, 2)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in projector_parameters(model).values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    export = export_projector(model, tmp_path / "export", metadata={"base_model": str(base)})

    argv = ["generate", "--projector", str(export), "--image", str(wide_image / "wide.png")]
    assert cli([*argv, "--prompt", QUESTION, "--max-new-tokens", "4", "--show-prompt"]) == 0
    captured = capsys.readouterr()
    assert f"USER: <image>x{views * K}\n{QUESTION} ASSISTANT:" in captured.err
    assert f"(VisionZip 6 + 2: {views * K} tokens per image)" in captured.err

    sample = {"id": "q", "image": "wide.png", "conversations": [{"from": "human", "value": QUESTION}]}
    sample["conversations"].append({"from": "gpt", "value": "x"})
    (wide_image / "sample.json").write_text(json.dumps([sample]))
    processing = load_processing(str(base))
    dataset = SupervisedDataset(  # an export without a recipe prompts in the model's chat template (for_recipe)
        load_samples(wide_image / "sample.json"),
        DataConfig(image_folder=wide_image, template="chat_template"),
        processing,
        build.placeholders(model.config),
    )
    item = dataset[0]
    assert item["vision"]["pixel_values"].shape[-2:] == (model.config.image_size_aux,) * 2
    expected, prompt = greedy_answer(model, processing.tokenizer, item, 4)
    assert prompt.count(model.config.image_token_id) == views * K
    assert expected and captured.out.strip() == expected


def test_data_preview_counts_mgm_placeholders(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "mgm", TinySpec(family="mini_gemini", image_size=56, vision_layers=2, hd=True))
    demo = make_demo_dataset(tmp_path / "demo", n=8, seed=2)
    common = ["data", "preview", "--data", str(demo.train), "--image-folder", str(demo.images), "--model"]
    common += [str(model_dir), "--n", "1"]
    assert cli([*common, "--dominant", "6", "--contextual", "2"]) == 0
    assert f"<image×{5 * K}>" in capsys.readouterr().out  # 5 views x (6 + 2)
    assert cli(common) == 0
    assert f"<image×{5 * 16}>" in capsys.readouterr().out  # stock: 5 views x 16 patches
