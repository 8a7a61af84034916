"""Training end to end for Qwen2.5-VL and Qwen3-VL: the demo recipe with ``model.tiny.family`` set, the model's
chat template, images and videos, projector mode on the merger(s), export and load; two processes under ZeRO-3."""

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
from visionzip_tune.families import projector_parameters
from visionzip_tune.data.processing import load_processing
from visionzip_tune.training.loop import train

FRAMES = 4
IMAGE_TOKENS = 8  # a 224 px demo image resized to 112 px: 8 x 8 patches, 16 merged tokens -> 7 + 1 at 0.45 + 0.05
VIDEO_TOKENS = 2 * 8  # 4 frames: 2 temporal slices of 16 merged tokens


def qwen_args(family: str, root: Path, out: Path, *overrides: str) -> list[str]:
    """Overrides of the demo recipe for a short run of a tiny ``family`` model on demo data with videos."""
    return [
        f"model.name_or_path={root / family}",
        f"model.tiny.family={family}",
        "model.tiny.vision_layers=2",
        "visionzip.dominant_ratio=0.45",
        "visionzip.contextual_ratio=0.05",
        f"data.path={root / 'demo' / 'train.json'}",
        f"data.image_folder={root / 'demo' / 'images'}",
        f"data.eval_path={root / 'demo' / 'eval.json'}",
        "data.demo_samples=24",
        "data.demo_videos=8",
        f"data.video_frames={FRAMES}",
        "data.template=chat_template",
        "data.image_aspect=processor",
        "data.max_length=512",
        "train.max_steps=3",
        "train.micro_batch_size=4",
        "train.save_every=0",
        "logging.progress_bar=false",
        f"output.dir={out}",
        *overrides,
    ]


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("qwen2_5_vl", ()),
        ("qwen3_vl", ()),
        ("qwen3_vl", ("train.projector_modules=merger", "visionzip.merge_space=pre")),
    ],
    ids=["qwen2_5_vl", "qwen3_vl", "qwen3_vl-merger-pre"],
)
def test_qwen_trains_its_mergers_and_exports_them(family, extra, tmp_path):
    out = tmp_path / "run"
    trained = train(load_config(DEMO, qwen_args(family, tmp_path, out, *extra)), init_distributed(), str(DEMO))

    steps = records(out, "train")
    assert [r["step"] for r in steps] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in steps)
    for r in steps:  # every placeholder the data path wrote is a token the zipped features filled
        assert r["vision_tokens"] == IMAGE_TOKENS * r["images"] + VIDEO_TOKENS * r["videos"]
        assert r["vision_tokens_per_unit"] is None  # ratios: K follows each image's size, so the mean is shown
        assert r["vision_tokens_per_image"] == r["vision_tokens"] / (r["images"] + r["videos"])
    assert sum(r["videos"] for r in steps) > 0 and sum(r["images"] for r in steps) > 0
    assert [r["step"] for r in records(out, "eval")] == [0, 3]

    base = AutoModelForImageTextToText.from_pretrained(tmp_path / family)
    exported = load_file(out / "export" / "projector.safetensors")
    before = {name: p.detach().clone() for name, p in projector_parameters(base).items()}
    assert exported.keys() == before.keys()
    changed = {name for name in before if not torch.equal(exported[name], before[name])}
    if "train.projector_modules=merger" in extra:  # the DeepStack mergers stay as they were
        assert changed and all(name.startswith("visual.merger.") for name in changed)
    else:
        assert any(name.startswith("visual.merger.") for name in changed)
        if family == "qwen3_vl":
            assert any(name.startswith("visual.deepstack_merger_list.") for name in changed)
    after = projector_parameters(trained)
    assert all(torch.equal(exported[name], after[name].detach()) for name in after)

    record = json.loads((out / "export" / "visionzip.json").read_text())
    assert (record["family"], record["dominant_ratio"], record["contextual_ratio"]) == (family, 0.45, 0.05)
    assert record["merge_space"] == ("pre" if "visionzip.merge_space=pre" in extra else "post")
    load_projector(base, out / "export", image_processor=load_processing(tmp_path / family).image_processor)
    assert base.config.visionzip["merge_space"] == record["merge_space"]
    for name, param in projector_parameters(base).items():
        assert torch.equal(param.detach(), exported[name])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_zero3_two_processes_with_mixed_micro_batches(family, tmp_path):
    """Under ZeRO-3 (weights sharded at load by zero.Init) every forward gathers parameters collectively: a rank
    whose micro-batch holds a video while the other's holds an image, or only text, must still run the same
    modules (the tower on a blank image / frame, the merger(s) twice in post mode). Then both export together."""
    from visionzip_tune.demo.dataset import make_demo_dataset

    demo = make_demo_dataset(tmp_path / "demo", n=24, seed=0, n_eval=4, videos=8)
    samples = json.loads(demo.train.read_text())
    video = [s for s in samples if "video" in s][:2]
    image = [s for s in samples if "image" in s][:3]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps([video[0], image[0], image[1], text_only_samples(1)[0], video[1], image[2]]))
    out = tmp_path / "run"
    args = qwen_args(
        family,
        tmp_path,
        out,
        f"data.path={data}",
        f"data.image_folder={demo.images}",
        f"data.eval_path={demo.eval}",
        "deepspeed.zero_stage=3",
        "data.group_by_modality=false",
        "train.micro_batch_size=1",
    )
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    port = str(29470 + ["qwen2_5_vl", "qwen3_vl"].index(family))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", port]
    done = subprocess.run(
        [*cmd, "-m", "visionzip_tune", "train", str(DEMO), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[train] ZeRO-3: weights sharded across ranks at load" in done.stdout
    steps = records(out, "train")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert sum(r["videos"] for r in steps) >= 1 and sum(r["images"] for r in steps) >= 1
    assert all(r["vision_tokens"] == IMAGE_TOKENS * r["images"] + VIDEO_TOKENS * r["videos"] for r in steps)
    exported = load_file(out / "export" / "projector.safetensors")
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / family)
    assert {name: tuple(t.shape) for name, t in exported.items()} == {
        name: tuple(p.shape) for name, p in projector_parameters(base).items()
    }  # whole tensors, gathered from the shards
    load_projector(base, out / "export")
