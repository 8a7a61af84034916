"""The compressed-feature cache (``train.feature_cache``, ``python -m visionzip_tune cache``): training from it ends
with the same projector as training without it, for every family (float32, |diff| <= 1e-6), also under torchrun
with ZeRO-2 and ZeRO-3; the tower never runs on a cached batch; a build killed with SIGKILL resumes into the same
cache; every part of the key, changed alone, is noticed; what cannot use a cache is refused in one paragraph."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO, ROOT, cli_error, records, text_only_samples, train_args
from PIL import Image
from safetensors.torch import load_file
from test_mini_gemini_train import mgm_args
from test_train_families import family_args
from test_train_qwen import qwen_args

from visionzip_tune.data import Collator
from visionzip_tune.demo.dataset import make_demo_dataset
from visionzip_tune.demo.tiny import TinySpec, save_tiny
from visionzip_tune.distributed import init_distributed
from visionzip_tune.errors import UserError
from visionzip_tune.families import vision_tower
from visionzip_tune.families.forward import forward_with_vision, frozen_blanks, to_model_inputs
from visionzip_tune.feature_cache import Shards
from visionzip_tune.loading import load_model_processing, load_vlm
from visionzip_tune.training import build
from visionzip_tune.training.cache import build_options, open_cache
from visionzip_tune.training.cache_command import run_cache_worker
from visionzip_tune.training.config import load_config
from visionzip_tune.training.loop import train


def projector(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "export" / "projector.safetensors")


def assert_same_training(plain: Path, cached: Path) -> None:
    """The same projector (float32, within 1e-6) and the same steps: losses, images and vision tokens."""
    a, b = projector(plain), projector(cached)
    assert a.keys() == b.keys()
    worst = max((a[name] - b[name]).abs().max().item() for name in a)
    assert worst <= 1e-6, f"the projectors differ by {worst}"
    steps_a, steps_b = records(plain, "train"), records(cached, "train")
    for key in ("loss", "images", "videos", "vision_tokens"):
        assert [r[key] for r in steps_a] == pytest.approx([r[key] for r in steps_b], abs=1e-6), key


def entries(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every entry of every cache under ``root``: ``{digest/key: {field: tensor}}``, and the bad ones' reasons."""
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        shards = Shards(folder)
        for key in shards.fields:
            found[f"{folder.name}/{key}"] = shards.read(key, "")
        found.update((f"{folder.name}/{key}", {"bad": reason}) for key, reason in shards.bad.items())
    return found


def same_entries(a: dict, b: dict) -> bool:
    """Whether two :func:`entries` hold the same entries with equal fields."""
    if a.keys() != b.keys() or any(a[key].keys() != b[key].keys() for key in a):
        return False
    return all(
        a[key][field] == b[key][field] if field == "bad" else torch.equal(a[key][field], b[key][field])
        for key in a
        for field in a[key]
    )


def with_corrupt_image(paths, out: Path) -> Path:
    """The demo's training data plus a sample whose image is not a PNG (data.on_bad_sample=skip drops it)."""
    samples = json.loads(paths.train.read_text())
    (paths.images / "corrupt.png").write_bytes(b"not a png at all")
    out.write_text(json.dumps([*samples[:11], {**samples[0], "id": "corrupt", "image": "corrupt.png"}, *samples[11:]]))
    return out


def test_llava_trains_the_same_projector_from_the_cache_and_rereads_it(train_assets, tmp_path):
    """First run: builds the cache (a corrupt image recorded as bad, skipped as without a cache), then trains from
    it. Rerun with another learning rate: reads every entry, builds nothing, and still matches its uncached twin."""
    data = with_corrupt_image(train_assets[1], tmp_path / "data.json")
    cache = tmp_path / "cache"
    common = (f"data.path={data}", "data.on_bad_sample=skip")
    for lr, build_missing in (("1e-2", "true"), ("3e-3", "false")):
        plain, cached = tmp_path / f"plain-{lr}", tmp_path / f"cached-{lr}"
        train(load_config(DEMO, train_args(train_assets, plain, *common, f"train.lr={lr}")), init_distributed())
        overrides = (f"train.feature_cache={cache}", f"train.feature_cache_build={build_missing}")
        train(
            load_config(DEMO, train_args(train_assets, cached, *common, f"train.lr={lr}", *overrides)),
            init_distributed(),
        )
        assert_same_training(plain, cached)
        assert json.loads((cached / "skipped.jsonl").read_text().splitlines()[0])["id"] == "corrupt"
    built = entries(cache)
    assert sum("bad" in fields for fields in built.values()) == 1
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert {p.name for p in folder.iterdir()} >= {"key.json", ".build.lock"}
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]


FAMILIES = [
    ("llava_next", family_args, ()),
    ("llava_next", family_args, ("visionzip.token_order=grid",)),
    ("video_llava", family_args, ()),
    ("llava_onevision", family_args, ("data.template=chat_template",)),
    ("qwen2_5_vl", qwen_args, ("visionzip.method=divprune", "visionzip.tokens=4")),
    ("qwen3_vl", qwen_args, ()),
    ("qwen3_vl", qwen_args, ("train.projector_modules=merger", "visionzip.merge_space=pre")),
    ("mini_gemini", None, ("train.projector_modules=mlp_only",)),
]


@pytest.mark.slow  # LLaVA-1.5's case is quick (test_llava_trains_the_same_projector_from_the_cache_and_rereads_it)
@pytest.mark.parametrize(
    ("family", "args", "extra"),
    FAMILIES,
    ids=[f"{family}{'-' + '-'.join(e.split('=')[1] for e in extra) if extra else ''}" for family, _, extra in FAMILIES],
)
def test_every_family_trains_the_same_projector_from_the_cache(family, args, extra, tmp_path):
    def overrides(out: Path, *more: str) -> list[str]:
        if family == "mini_gemini":
            return mgm_args(tmp_path, out, *extra, *more)
        listed = args(family, tmp_path, out, *extra, *more)
        if "visionzip.method=divprune" in extra:  # a count of rows per unit: VisionZip's ratios would be refused
            listed = [arg for arg in listed if "_ratio=" not in arg]
        return listed

    plain, cached = tmp_path / "plain", tmp_path / "cached"
    train(load_config(DEMO, overrides(plain)), init_distributed())
    train(load_config(DEMO, overrides(cached, f"train.feature_cache={tmp_path / 'cache'}")), init_distributed())
    assert_same_training(plain, cached)
    steps = records(cached, "train")
    assert sum(r["images"] for r in steps) > 0
    if family in ("video_llava", "llava_onevision", "qwen2_5_vl", "qwen3_vl"):
        assert sum(r["videos"] for r in steps) > 0


def test_a_cached_batch_never_runs_the_tower(train_assets, tmp_path):
    """A batch of the cached training set holds rows, not pixels; its forward and backward reach the projector,
    and no tower module runs -- neither for its images nor for a text-only batch (the blank's frozen part)."""
    cfg = load_config(DEMO, train_args(train_assets, tmp_path / "run", f"train.feature_cache={tmp_path / 'cache'}"))
    model = load_vlm(cfg.model.name_or_path)
    build.apply_recipe_visionzip(model, cfg.visionzip)
    processing = load_model_processing(cfg.model.name_or_path)
    options = build_options(cfg)
    dist = init_distributed()
    run_cache = open_cache(cfg, dist, model, processing, torch.float32, options)
    run_cache.build_missing(model, dist, torch.device("cpu"), torch.float32, options)
    dataset = build.dataset(cfg, model.config, processing, media=run_cache.media)
    blanks = frozen_blanks(model, torch.device("cpu"), torch.float32)
    with_images = [dataset[i] for i in range(len(dataset)) if dataset[i]["vision"]][:2]
    text_only = {"id": "t", "input_ids": with_images[0]["input_ids"][:5], "labels": with_images[0]["labels"][:5]}
    calls = []
    hook = vision_tower(model).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for items in (with_images, [{**text_only, "vision": {}}]):
            batch = Collator(processing.tokenizer.pad_token_id)(items)
            assert not any(key.startswith("pixel_values") for key in batch)
            model.zero_grad()
            forward_with_vision(
                model, to_model_inputs(batch, torch.device("cpu"), torch.float32), blanks
            ).loss.backward()
            assert model.model.multi_modal_projector.linear_1.weight.grad is not None
    finally:
        hook.remove()
    assert calls == [], "the tower ran on a cached batch"
    assert any(key.startswith("cached_image.") for key in Collator(0)(with_images))


# ----------------------------------------------------------------------------------------------------------------
# The key


def test_every_part_of_the_key_changed_alone_is_noticed(train_assets, tmp_path):
    """A cache is built once; then each part of its key changes alone, and a run that may not build
    (train.feature_cache_build=false) refuses, naming that part -- the cache of another key is never read."""
    model_dir, paths = train_assets
    cache = tmp_path / "cache"
    images = tmp_path / "images"
    shutil.copytree(paths.images, images)
    base = (f"data.image_folder={images}", f"train.feature_cache={cache}")

    def refused(*overrides: str, model: Path = model_dir, dtype: torch.dtype = torch.float32) -> str:
        cfg = load_config(
            DEMO,
            train_args(
                train_assets,
                tmp_path / "run",
                *base,
                f"model.name_or_path={model}",
                "train.feature_cache_build=false",
                *overrides,
            ),
        )
        vlm = load_vlm(str(model))
        build.apply_recipe_visionzip(vlm, cfg.visionzip)
        processing = load_model_processing(str(model))
        with pytest.raises(UserError) as refusal:
            open_cache(cfg, init_distributed(), vlm, processing, dtype, build_options(cfg))
        return " ".join(str(refusal.value).split())

    cfg = load_config(DEMO, train_args(train_assets, tmp_path / "run", *base))
    run_cache_worker(cfg, build_options(cfg))
    built = entries(cache)

    def copy_of_model(name: str, change) -> Path:
        copy = tmp_path / name
        shutil.copytree(model_dir, copy)
        change(copy)
        return copy

    def edit_json(path: Path, **changes) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    def new_image_mean(folder: Path) -> None:  # the processor's settings live in processor_config.json
        settings = json.loads((folder / "processor_config.json").read_text())
        settings["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
        (folder / "processor_config.json").write_text(json.dumps(settings))

    def perturbed_tower(folder: Path) -> None:
        model = load_vlm(str(folder))
        with torch.no_grad():
            model.model.vision_tower.embeddings.patch_embedding.weight.add_(1e-3)
        model.save_pretrained(folder)

    changes = {
        "compressor and its budget (visionzip.*): dominant 6 -> 5": refused("visionzip.dominant=5"),
        "media transform (data.image_aspect, data.video_frames): image_aspect pad -> processor": refused(
            "data.image_aspect=processor"
        ),
        "media transform (data.image_aspect, data.video_frames): video_frames 8 -> 4": refused("data.video_frames=4"),
        "dtype the tower runs in (deepspeed.bf16): value float32 -> bfloat16": refused(dtype=torch.bfloat16),
        "image processor's settings (model.name_or_path's processor config): image_mean": refused(
            model=copy_of_model("processor", new_image_mean)
        ),
        "weights the rows come from": refused(model=copy_of_model("tower", perturbed_tower)),
        "model's vision config": refused(
            model=copy_of_model("layer", lambda m: edit_json(m / "config.json", vision_feature_layer=-1))
        ),
    }
    for part, message in changes.items():
        assert part in message, message
        assert "differs in" in message and "train.feature_cache_build=false" in message
    # The bytes of one image: the same cache, one entry missing, the changed file named.
    first = json.loads(paths.train.read_text())[0]["image"]
    with Image.open(images / first) as img:
        img.rotate(90).save(images / first)
    message = refused()
    assert "1 of the" in message and f"changed since they were cached ({images / first})" in message
    assert same_entries(entries(cache), built)  # nothing was written by the refusals


# ----------------------------------------------------------------------------------------------------------------
# Several processes, and a killed build


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def env(**more: str) -> dict[str, str]:
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        **more,
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_train_the_same_projector_from_the_cache(train_assets, tmp_path, stage):
    """Under torchrun (2 ranks, ZeRO-2 / ZeRO-3) the cache is built by both ranks, a share each -- under ZeRO-3
    through the engine's parameter gathers, the same tower calls on both -- and micro-batches of one sample mix
    images and text on the two ranks (a text-only rank feeds the blank's frozen part)."""
    samples = json.loads(train_assets[1].train.read_text())
    data = tmp_path / "mixed.json"
    with_image = [s for s in samples if "image" in s]
    data.write_text(json.dumps([*with_image[:5], *text_only_samples(3)]))
    common = (
        f"data.path={data}",
        f"deepspeed.zero_stage={stage}",
        "data.group_by_modality=false",
        "train.micro_batch_size=1",
        "train.max_steps=4",
    )
    for name, extra in (("plain", ()), ("cached", (f"train.feature_cache={tmp_path / 'cache'}",))):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
        args = train_args(train_assets, tmp_path / name, *common, *extra)
        done = subprocess.run(
            [*cmd, "-m", "visionzip_tune", "train", str(DEMO), *args],
            env=env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[cache] built 5 entries" in done.stdout
    assert_same_training(tmp_path / "plain", tmp_path / "cached")


@pytest.mark.slow
def test_a_build_killed_with_sigkill_resumes_into_the_same_cache(train_assets, tmp_path):
    """``python -m visionzip_tune cache`` (torchrun, one process) is SIGKILLed, launcher and worker, once it has
    written a shard; the same command then builds the rest. The cache equals one built without a kill, file for file
    and tensor for tensor, and training reads it without building anything."""
    demo = make_demo_dataset(tmp_path / "demo", n=160, seed=1, n_eval=8)
    assets = (train_assets[0], demo)

    def command(root: Path) -> list[str]:
        args = train_args(assets, tmp_path / "run", f"train.feature_cache={root}")
        return [
            sys.executable,
            "-m",
            "visionzip_tune",
            "cache",
            str(DEMO),
            *args,
            "--batch-size=1",
            "--shard-entries=2",
        ]

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = subprocess.Popen(
        command(killed),
        env=env(NPROC_PER_NODE="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not list(killed.glob("*/shard-*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    shards_at_kill = len(list(killed.glob("*/shard-*.safetensors")))

    done = subprocess.run(command(killed), env=env(NPROC_PER_NODE="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cfg = load_config(DEMO, command(whole)[5:-2])
    run_cache_worker(cfg, build_options(cfg, batch_size=1, shard_entries=2))
    (folder,) = [p for p in killed.iterdir() if p.is_dir()]
    names = sorted(p.name for p in folder.glob("shard-*.safetensors"))
    assert shards_at_kill < len(names), "the kill left every shard: nothing was resumed"
    assert names == sorted(p.name for p in (whole / folder.name).glob("shard-*.safetensors"))
    assert same_entries(entries(killed), entries(whole))
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]  # the rerun cleared what the kill left

    cached = tmp_path / "cached"
    train(
        load_config(
            DEMO, train_args(assets, cached, f"train.feature_cache={killed}", "train.feature_cache_build=false")
        ),
        init_distributed(),
    )
    assert (cached / "export" / "projector.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Refusals: one paragraph, exit status 2, nothing written


def test_what_cannot_use_a_cache_is_refused_in_one_paragraph(train_assets, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = train_args(train_assets, out, f"train.feature_cache={cache}")
    unbudgeted = [arg for arg in args if not arg.startswith(("visionzip.dominant=", "visionzip.contextual="))]
    mgm = save_tiny(tmp_path / "mgm", TinySpec(family="mini_gemini", image_size=56, vision_layers=2))
    refusals = {
        "visionzip.enabled=false feeds the LLM every tower token: set visionzip.enabled=true": [
            "train",
            str(DEMO),
            *unbudgeted,  # a budget given beside enabled=false is refused as a key that does not apply
            "visionzip.enabled=false",
            "--check",
        ],
        "visionzip.resample=true: it draws new positions at every call": [
            "train",
            str(DEMO),
            *unbudgeted,
            "visionzip.method=random",
            "visionzip.tokens=4",
            "visionzip.resample=true",
            "--check",
        ],
        "trains its patch-info-mining projections here": [
            "train",
            str(DEMO),
            *args,
            f"model.name_or_path={mgm}",
            "--check",
        ],
        "the cache command builds train.feature_cache: set it to a directory": [
            "cache",
            str(DEMO),
            *train_args(train_assets, out),
        ],
        "--batch-size 0: give a number of at least 1": ["cache", str(DEMO), *args, "--batch-size=0"],
    }
    for expected, argv in refusals.items():
        assert expected in cli_error(argv, capsys)
    assert "Set train.projector_modules to that subset" in cli_error(
        refusals["trains its patch-info-mining projections here"], capsys
    )
    cfg = load_config(DEMO, [*args, f"model.name_or_path={mgm}"])
    with pytest.raises(UserError, match="subset mlp_only trains the MLP alone"):
        train(cfg, init_distributed())
    assert not out.exists() and not cache.exists()


def test_a_corrupt_image_stops_the_build_as_it_stops_training(train_assets, tmp_path):
    data = with_corrupt_image(train_assets[1], tmp_path / "data.json")
    cache = tmp_path / "cache"
    cfg = load_config(
        DEMO, train_args(train_assets, tmp_path / "run", f"data.path={data}", f"train.feature_cache={cache}")
    )
    with pytest.raises(UserError, match=r"sample id corrupt: unreadable image .*data.on_bad_sample=skip"):
        train(cfg, init_distributed())
    assert not list(cache.glob("*/shard-*"))
