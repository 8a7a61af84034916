"""Training end to end for LLaVA-NeXT (anyres crops), Video-LLaVA (video frames) and LLaVA-OneVision (SigLIP, crops
and frames): the same loop, recipe and export as LLaVA-1.5, on tiny random models and the demo data with videos."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO, ROOT, records, text_only_samples
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from visionzip_tune.training.config import load_config
from visionzip_tune.distributed import init_distributed
from visionzip_tune.export import load_projector
from visionzip_tune.families import projector_modules
from visionzip_tune.training.loop import train

K = 6 + 2  # VisionZip tokens per image, crop or frame in these runs
FRAMES = 4
CROPS = 5  # the demo's 224 px square images on 56 px crops: the 2x2 grid plus the base crop


def family_args(family: str, root: Path, out: Path, *overrides: str) -> list[str]:
    """Overrides of the demo recipe for a short run of a tiny ``family`` model on demo data with videos."""
    video = family in ("video_llava", "llava_onevision")
    return [
        f"model.name_or_path={root / family}",
        f"model.tiny.family={family}",
        "model.tiny.tower=null",  # the family's own tower: SigLIP for OneVision
        "model.tiny.image_size=56",
        "model.tiny.vision_layers=2",
        f"data.path={root / 'demo' / 'train.json'}",
        f"data.image_folder={root / 'demo' / 'images'}",
        f"data.eval_path={root / 'demo' / 'eval.json'}",
        "data.demo_samples=24",
        f"data.demo_videos={8 if video else 0}",
        *([f"data.video_frames={FRAMES}"] if video else []),
        "data.image_aspect=processor",  # the family's own anyres tiling
        "data.max_length=512",
        "visionzip.dominant=6",
        "visionzip.contextual=2",
        "train.max_steps=3",
        "train.micro_batch_size=4",
        "train.save_every=0",
        "logging.progress_bar=false",
        f"output.dir={out}",
        *overrides,
    ]


def tokens_per_unit(family: str) -> int:
    """Vision tokens one demo image becomes: every crop zipped for the anyres families, else one image."""
    return CROPS * K if family in ("llava_next", "llava_onevision") else K


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("llava_next", ()),
        ("llava_next", ("visionzip.token_order=grid",)),
        ("video_llava", ()),
        ("llava_onevision", ("data.template=chat_template",)),
        ("video_llava", ("train.mode=lora", "train.lora_r=4", "train.lora_alpha=8")),
    ],
    ids=["llava_next", "llava_next-grid", "video_llava", "llava_onevision", "video_llava-lora"],
)
def test_family_trains_the_projector_and_exports_it(family, extra, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(DEMO, family_args(family, tmp_path, out, *extra))
    trained = train(cfg, init_distributed(), recipe=str(DEMO))

    steps = records(out, "train")
    assert [r["step"] for r in steps] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in steps)
    for r in steps:  # every placeholder the data path wrote is a token the model's features filled
        assert r["vision_tokens"] == tokens_per_unit(family) * r["images"] + FRAMES * K * r["videos"]
    if family != "llava_next":
        assert sum(r["videos"] for r in steps) > 0, "the demo's video samples reached training"
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 3]
    kinds = ("image", "video") if family != "llava_next" else ("image",)
    for r in evals:  # accuracy per kind of held-out sample, adding up to the whole
        assert sum(r[f"total_{kind}"] for kind in kinds) == r["total"]
        assert sum(r[f"accuracy_{kind}"] * r[f"total_{kind}"] for kind in kinds) == pytest.approx(r["correct"])

    base = AutoModelForImageTextToText.from_pretrained(tmp_path / family)
    exported = {
        name.removeprefix("multi_modal_projector."): tensor
        for name, tensor in load_file(out / "export" / "projector.safetensors").items()
    }
    before = {n: p.detach() for n, p in base.model.multi_modal_projector.named_parameters()}
    assert exported.keys() == before.keys()
    assert any(not torch.equal(exported[n], before[n]) for n in before), "the projector did not train"
    after = {n: p.detach() for n, p in projector_modules(trained)["multi_modal_projector"].named_parameters()}
    assert all(torch.equal(exported[n], after[n]) for n in after)

    record = json.loads((out / "export" / "visionzip.json").read_text())
    assert record["family"] == family
    if "train.mode=lora" in extra:  # LoRA on the LLM's linears only: neither tower's q/k/v is wrapped
        adapter = json.loads((out / "export" / "adapter" / "adapter_config.json").read_text())
        wrapped = [name for name, _ in trained.named_modules() if name.endswith(".lora_A")]
        assert wrapped and all(".language_model." in name for name in wrapped)
        assert adapter["r"] == 4
    load_projector(base, out / "export")  # fingerprint, shapes and budget check out on the base model
    assert base.config.visionzip["dominant"] == 6 and base.config.visionzip["contextual"] == 2
    if extra == ("visionzip.token_order=grid",):
        assert base.config.visionzip["token_order"] == "grid"
    for n, p in base.model.multi_modal_projector.named_parameters():
        assert torch.equal(p.detach(), exported[n])


@pytest.mark.slow
def test_video_llava_zero3_two_processes_with_mixed_micro_batches(tmp_path):
    """Video-LLaVA has separate image and video towers: under ZeRO-3 every forward gathers parameters
    collectively, so a rank whose micro-batch holds a video while the other's holds an image (or only text) must
    still run the same modules. Four micro-batches of one sample per rank mix all three kinds."""
    from visionzip_tune.demo.dataset import make_demo_dataset

    demo = make_demo_dataset(tmp_path / "demo", n=24, seed=0, n_eval=4, videos=8)
    samples = json.loads(demo.train.read_text())
    video = [s for s in samples if "video" in s][:2]
    image = [s for s in samples if "image" in s][:3]
    text = text_only_samples(1)
    assert len(video) == 2 and len(image) == 3
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps([video[0], image[0], image[1], text[0], video[1], image[2]]))
    out = tmp_path / "run"
    args = family_args(
        "video_llava",
        tmp_path,
        out,
        f"data.path={data}",
        f"data.image_folder={demo.images}",
        f"data.eval_path={demo.eval}",
        "deepspeed.zero_stage=3",
        "data.group_by_modality=false",
        "train.micro_batch_size=1",
        "train.max_steps=3",
    )
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        "29457",
        "-m",
        "visionzip_tune",
        "train",
        str(DEMO),
        *args,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[train] ZeRO-3: weights sharded across ranks at load" in done.stdout
    steps = records(out, "train")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert sum(r["videos"] for r in steps) >= 1 and sum(r["images"] for r in steps) >= 1
    assert all(r["vision_tokens"] == K * r["images"] + FRAMES * K * r["videos"] for r in steps)
    assert (out / "export" / "projector.safetensors").is_file()
