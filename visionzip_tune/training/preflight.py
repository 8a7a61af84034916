"""What can be checked in seconds before a run starts (``train --check`` and the launcher run it), and the demo's
assets built when a demo recipe asks for them."""

from __future__ import annotations

import functools
from pathlib import Path

from transformers import AutoConfig

from visionzip_tune import families, watchdog
from visionzip_tune.algorithm.compressors import COMPRESSORS
from visionzip_tune.data import load_samples
from visionzip_tune.data.dataset import refuse_unusable
from visionzip_tune.demo.dataset import make_demo_dataset
from visionzip_tune.demo.tiny import save_tiny
from visionzip_tune.distributed import print0
from visionzip_tune.errors import UserError
from visionzip_tune.loading import check_model_source
from visionzip_tune.training import cache
from visionzip_tune.training.config import Config, VisionZipConfig
from visionzip_tune.training.keys import print_notices, refuse_unused_keys


def missing_inputs(cfg: Config) -> dict[str, str]:
    """Config key -> what is wrong, for every input file or folder of the recipe that does not exist."""
    data = cfg.data
    problems = {}
    for key, path, what in [
        ("data.path", data.path, "data file"),
        ("data.image_folder", data.image_folder, "image folder"),
        ("data.eval_path", data.eval_path, "data file"),
        ("data.eval_image_folder", data.eval_image_folder, "image folder"),
        ("data.video_folder", data.video_folder, "video folder"),
    ]:
        if path is None or (Path(path).is_file() if what == "data file" else Path(path).is_dir()):
            continue
        problems[key] = f"{key}: the {what} {path} does not exist (relative paths start at {Path.cwd()})"
    return problems


def demo_outputs(cfg: Config) -> set[str]:
    """Config keys whose paths the demo data builder writes (``data.build_demo_if_missing``): they may be missing
    before a run starts."""
    return {"data.path", "data.image_folder", "data.eval_path"} if cfg.data.build_demo_if_missing else set()


def preflight(cfg: Config) -> None:
    """What can be checked in seconds before anything starts (``train --check`` and the launcher run it): input
    files, the model path, every key set applying to the model's family and mode, the budget against the model's
    tower, the data's structure. Raises :class:`UserError`."""
    ignore = demo_outputs(cfg)
    problems = [problem for key, problem in missing_inputs(cfg).items() if key not in ignore]
    if problems:
        raise UserError(problems[0])
    cache.refuse_uncacheable(cfg, check_keys(cfg))
    if cfg.data.on_bad_sample == "error":
        for key, path in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)):
            if path is not None and key not in ignore:
                refuse_unusable(load_samples(path))


def check_keys(cfg: Config) -> families.Family:
    """The family of the recipe's model, once every key set is known to take effect with it (``training.keys``) and
    the budget fits its tower (both from the model's config alone); returns the family."""
    tiny_demo = cfg.model.build_tiny_if_missing and not Path(cfg.model.name_or_path).exists()
    if tiny_demo:
        family = families.FAMILIES[cfg.model.tiny.family]
    else:
        with watchdog.phase("checking the model", f"the config of {cfg.model.name_or_path} (the hub's if not cached)"):
            check_model_source(cfg.model.name_or_path)
            model_config = model_config_of(cfg.model.name_or_path)
        family = family_of_config(cfg.model.name_or_path, model_config)
        if (
            cfg.model.build_tiny_if_missing
            and "model.tiny.family" in cfg.sources
            and cfg.model.tiny.family != family.name
        ):
            raise UserError(
                f"model.tiny.family={cfg.model.tiny.family!r} ({cfg.sources['model.tiny.family']}), but "
                f"model.name_or_path={cfg.model.name_or_path!r} already holds a {family.name} model, which is used as "
                "it is: choose another model.name_or_path for the tiny model, or delete that directory"
            )
    print_notices([*cfg.notices, *refuse_unused_keys(cfg, family)])
    if cfg.visionzip.enabled and not tiny_demo:
        checked_budget(cfg.visionzip, family, functools.partial(families.resolve_budget, model_config))
    return family


def model_config_of(name_or_path: str):
    """The transformers config of the model at ``name_or_path``, or a :class:`UserError` naming the key."""
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise UserError(f"model.name_or_path={name_or_path!r}: cannot read its config: {err}") from None


def family_of_config(name_or_path: str, model_config) -> families.Family:
    try:
        return families.family_of(model_config)
    except ValueError as err:
        raise UserError(f"model.name_or_path={name_or_path!r}: {err}") from None


def recipe_budget(visionzip: VisionZipConfig, family: families.Family) -> dict:
    """The recipe's budget as the family takes it: VisionZip's (``Family.budget.keys``: counts for the LLaVA
    families, ratios for Qwen) or another compressor's (``visionzip.method``: its tokens and parameters), with the
    family's knobs; :class:`UserError` when VisionZip's first key is not set."""
    knobs = {key: getattr(visionzip, key) for key in family.knob_keys if getattr(visionzip, key) is not None}
    if visionzip.method != "visionzip":
        compressor = COMPRESSORS[visionzip.method]
        params = {key: getattr(visionzip, key) for key in compressor.parameters if getattr(visionzip, key) is not None}
        return {"method": visionzip.method, **params, **knobs}
    keys = family.budget.keys
    if getattr(visionzip, keys[0]) is None:
        raise UserError(
            f"visionzip.{keys[0]} is not set: {family.model_class} takes its VisionZip budget as "
            f"{', '.join('visionzip.' + key for key in keys)} (e.g. visionzip.dominant_ratio=0.45 "
            "visionzip.contextual_ratio=0.05 for 50% of each image's merged tokens); visionzip.dominant and "
            f"visionzip.contextual ({visionzip.dominant} and {visionzip.contextual} here) are the LLaVA families' "
            "tokens per image"
        )
    return {key: getattr(visionzip, key) for key in keys if getattr(visionzip, key) is not None} | knobs


def checked_budget(visionzip: VisionZipConfig, family: families.Family, check) -> None:
    """``check(**budget)`` on the recipe's budget; its ``ValueError`` as a :class:`UserError` naming the keys."""
    budget = recipe_budget(visionzip, family)
    try:
        check(**budget)
    except ValueError as err:
        given = ", ".join(f"visionzip.{key}={value}" for key, value in budget.items())
        raise UserError(f"{given}: {err}") from None


def build_demo_assets(cfg: Config) -> None:
    """Build the tiny model and the demo data of a demo recipe when missing (call on one rank)."""
    if cfg.model.build_tiny_if_missing and not Path(cfg.model.name_or_path).exists():
        print0(f"[train] building a random tiny {cfg.model.tiny.family} model in {cfg.model.name_or_path}")
        save_tiny(cfg.model.name_or_path, cfg.model.tiny)
    if cfg.data.build_demo_if_missing and not Path(cfg.data.path).exists():
        out = Path(cfg.data.path).parent
        print0(f"[train] writing the demo dataset ({cfg.data.demo_samples} samples) into {out}")
        make_demo_dataset(out, n=cfg.data.demo_samples, seed=cfg.data.demo_seed, videos=cfg.data.demo_videos)
