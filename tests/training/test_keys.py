"""Every config key set is used or refused, never silently ignored (training/keys.py).

The walk sets each key of the config, on its own, to a value other than its default, for every family, mode and
(for the budget's keys) compressor, and asserts one of two outcomes: the run refuses it before anything starts,
naming the key, or it is used. Which one is stated here independently of the rules in keys.py (:func:`applies`),
and "used" is shown: a budget key changes the budget the model records, a model.tiny key the tiny model built, any
other key is read by the package's code. A key the config gains fails the walk until it is given a probe here.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import typing
from pathlib import Path

import pytest

from visionzip_tune import families
from visionzip_tune.algorithm.compressors import COMPRESSORS
from visionzip_tune.demo.tiny import BUILDERS, TinySpec, build_config, build_image_processor, save_tiny
from visionzip_tune.errors import UserError
from visionzip_tune.training.cache import refuse_uncacheable
from visionzip_tune.training.config import Config, load_config
from visionzip_tune.training.keys import judge_keys
from visionzip_tune.training.preflight import check_keys, checked_budget

PACKAGE = Path(__file__).resolve().parents[2] / "visionzip_tune"
FAMILY_NAMES = tuple(families.FAMILIES)
QWEN = ("qwen2_5_vl", "qwen3_vl")
VIDEO = ("video_llava", "llava_onevision", "qwen2_5_vl", "qwen3_vl")
MODES = ("projector", "full", "lora")
METHODS = tuple(COMPRESSORS)

# A valid value other than the default for every key; None: the walk's own value (the family, the compressor).
PROBES: dict[str, object] = {
    "model.name_or_path": None,
    "model.attn_implementation": "eager",
    "model.build_tiny_if_missing": None,
    "model.tiny.family": None,
    "model.tiny.tower": None,
    "model.tiny.image_size": 84,
    "model.tiny.patch_size": 7,
    "model.tiny.vision_hidden": 32,
    "model.tiny.vision_layers": 2,
    "model.tiny.vision_heads": 2,
    "model.tiny.text_hidden": 32,
    "model.tiny.text_layers": 1,
    "model.tiny.text_heads": 2,
    "model.tiny.seed": 3,
    "model.tiny.text_init_std": 0.1,
    "model.tiny.crop_grids": "1x2 2x1",
    "model.tiny.hd": True,
    "visionzip.enabled": False,
    "visionzip.dominant": 10,
    "visionzip.contextual": 3,
    "visionzip.eager": True,
    "visionzip.token_order": "grid",
    "visionzip.dominant_ratio": 0.3,
    "visionzip.contextual_ratio": 0.1,
    "visionzip.merge_space": "pre",
    "visionzip.method": None,
    "visionzip.tokens": 9,  # a square: pool takes sqrt(K) x sqrt(K)
    "visionzip.seed": 3,
    "visionzip.resample": True,
    "visionzip.important_ratio": 0.25,
    "visionzip.neighbours": 8,
    "data.path": "other/train.json",
    "data.image_folder": "other/images",
    "data.eval_path": "other/eval.json",
    "data.eval_image_folder": "other/eval-images",
    "data.video_folder": "other/videos",
    "data.video_frames": 4,
    "data.template": "chat_template",
    "data.image_aspect": "processor",
    "data.max_length": 512,
    "data.on_bad_sample": "skip",
    "data.num_workers": 0,
    "data.group_by_modality": False,
    "data.build_demo_if_missing": False,
    "data.demo_samples": 50,
    "data.demo_seed": 3,
    "data.demo_videos": 5,
    "train.mode": None,
    "train.epochs": 2,
    "train.max_steps": 5,
    "train.micro_batch_size": 2,
    "train.grad_accum": 2,
    "train.projector_modules": "all",
    "train.lr": 1e-3,
    "train.projector_lr": 1e-3,
    "train.weight_decay": 0.1,
    "train.warmup_ratio": 0.1,
    "train.max_grad_norm": 0.5,
    "train.activation_checkpointing": False,
    "train.lora_r": 8,
    "train.lora_alpha": 16,
    "train.lora_dropout": 0.1,
    "train.save_every": 5,
    "train.keep_checkpoints": 0,
    "train.eval_every": 5,
    "train.eval_batch_size": 4,
    "train.resume": "never",
    "train.seed": 3,
    "train.save_on_signal": "SIGTERM",
    "train.feature_cache": "cache/x",
    "train.feature_cache_build": False,
    "deepspeed.zero_stage": 3,
    "deepspeed.bf16": False,
    "deepspeed.offload_optimizer": True,
    "logging.wandb": False,
    "logging.wandb_project": "other",
    "logging.wandb_run_name": "other",
    "logging.progress_bar": False,
    "output.dir": "runs/other",
    "output.export": False,
}


# A key turned off and the keys it governs (which the walk's base sets a few of).
SWITCHES = [
    ("visionzip.enabled=false", ["visionzip.dominant=6", "visionzip.eager=true"]),
    ("train.max_steps=5", ["train.epochs=2"]),
    ("train.projector_lr=1e-3", ["train.lr=1e-3"]),
    ("data.eval_path=null", ["train.eval_every=5", "train.eval_batch_size=4", "data.eval_image_folder=x"]),
    ("data.build_demo_if_missing=false", ["data.demo_samples=50", "data.demo_seed=3", "data.demo_videos=5"]),
    ("model.build_tiny_if_missing=false", ["model.tiny.vision_layers=2", "model.tiny.family=llava"]),
    ("deepspeed.zero_stage=0", ["deepspeed.offload_optimizer=true"]),
    ("logging.wandb=false", ["logging.wandb_project=other", "logging.wandb_run_name=other"]),
    ("train.feature_cache=null", ["train.feature_cache_build=false"]),
]
SWITCH_KEYS = {switch.split("=")[0] for switch, _ in SWITCHES}


def leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            keys += leaf_keys(hints[field.name], f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


KEYS = leaf_keys()
BUDGET_KEYS = [key for key in KEYS if key.startswith("visionzip.")]


def applies(key: str, family: str, mode: str, method: str) -> bool:
    """Whether a key set on its own on top of :func:`base_overrides` takes effect, as the README states it."""
    qwen = family in QWEN
    rules = {
        "visionzip.dominant": method == "visionzip" and not qwen,
        "visionzip.contextual": method == "visionzip" and not qwen,
        "visionzip.dominant_ratio": method == "visionzip" and qwen,
        "visionzip.contextual_ratio": method == "visionzip" and qwen,
        "visionzip.tokens": method != "visionzip",
        "visionzip.seed": method == "random",
        "visionzip.resample": method == "random",
        "visionzip.important_ratio": method == "vispruner",
        "visionzip.neighbours": method == "prumerge_plus",
        "visionzip.eager": not qwen,
        # grid is VisionZip's own layout of LLaVA-NeXT's crops (the value is refused elsewhere)
        "visionzip.token_order": family == "llava_next" and method == "visionzip",
        "visionzip.merge_space": qwen,
        "train.lora_r": mode == "lora",
        "train.lora_alpha": mode == "lora",
        "train.lora_dropout": mode == "lora",
        "data.video_folder": family in VIDEO,
        "data.video_frames": family in VIDEO,
        "model.tiny.crop_grids": family in ("llava_next", "llava_onevision"),
        "model.tiny.hd": family == "mini_gemini",
        "model.tiny.tower": family not in QWEN + ("mini_gemini",),  # a tiny Mini-Gemini needs CLIP, refused there
        # Mini-Gemini's projector set trains its mining, which reads every patch: only mlp_only can be cached
        "train.feature_cache": family != "mini_gemini",
        "train.feature_cache_build": False,  # the base sets no cache (the switches' test sets one)
    }
    return rules.get(key, True)


def base_overrides(family: str, mode: str, method: str, model_dir: Path) -> list[str]:
    """A run in which every switch is on (held-out set, demo data, W&B, ZeRO-2), every key of it used."""
    budget = (
        [f"visionzip.method={method}", "visionzip.tokens=16"]
        if method != "visionzip"
        else ["visionzip.dominant_ratio=0.45", "visionzip.contextual_ratio=0.05"]
        if family in QWEN
        else ["visionzip.dominant=6", "visionzip.contextual=2"]
    )
    return [
        f"model.name_or_path={model_dir}",
        "model.build_tiny_if_missing=true",
        f"model.tiny.family={family}",
        "model.tiny.image_size=112",
        f"train.mode={mode}",
        "data.eval_path=data/eval.json",
        "data.build_demo_if_missing=true",
        "logging.wandb=true",
        *budget,
    ]


def value_of(key: str, family: str, method: str, mode: str, model_dir: Path) -> object:
    if key == "model.tiny.tower":  # the tower the family's tiny model does not have by default
        return "clip" if BUILDERS[family].tower == "siglip" else "siglip"
    probe = PROBES[key]
    if probe is not None:
        return probe
    walk = {
        "model.tiny.family": family,
        "visionzip.method": method,
        "train.mode": mode,
        "model.name_or_path": model_dir,
    }
    return walk.get(key, True)


@functools.cache
def tokenizer_of(family: str):
    return BUILDERS[family].tokenizer(None)


def tiny_model_config(spec: TinySpec):
    return _tiny_model_config(dataclasses.astuple(spec))


@functools.cache
def _tiny_model_config(fields: tuple):
    spec = TinySpec(*fields)
    return build_config(spec, tokenizer_of(spec.family))


def verdict(cfg: Config, key: str, family: str) -> str:
    """ "refused" when keys.py refuses ``key`` or the budget check names it; else "used"."""
    judged = judge_keys(cfg, families.FAMILIES[family])
    assert not judged.notices, "nothing comes from a recipe here"
    refused = [line for line in judged.refused if line.startswith(f"{key}=")]
    if key not in SWITCH_KEYS:  # turning a switch off refuses the keys of the base it governs
        assert len(judged.refused) == len(refused), f"only the probed key may be refused: {judged.refused}"
    if refused:
        assert "(override '" in refused[0] and "does not apply:" in refused[0]
        return "refused"
    if key.startswith("model.tiny.") and key != "model.tiny.family":
        try:
            tiny_model_config(cfg.model.tiny)
        except UserError as err:
            assert key in str(err)
            return "refused"
    try:
        refuse_uncacheable(cfg, families.FAMILIES[family])
    except UserError as err:
        assert key in str(err)
        return "refused"
    if cfg.visionzip.enabled:
        try:
            checked_budget(
                cfg.visionzip,
                families.FAMILIES[family],
                functools.partial(families.resolve_budget, tiny_model_config(cfg.model.tiny)),
            )
        except UserError as err:
            assert key in str(err), f"the budget check must name {key}: {err}"
            return "refused"
    return "used"


def resolved_budget(cfg: Config, family: str) -> dict:
    model_config = tiny_model_config(cfg.model.tiny)
    resolved = {}
    checked_budget(
        cfg.visionzip,
        families.FAMILIES[family],
        lambda **budget: resolved.update(families.resolve_budget(model_config, **budget)),
    )
    return resolved


def tiny_build(spec: TinySpec) -> tuple[dict, dict]:
    """What a tiny spec builds, short of the weights: the model's config and the image processor's."""
    return tiny_model_config(spec).to_dict(), build_image_processor(spec).to_dict()


@functools.cache
def package_attributes() -> frozenset[str]:
    """Every attribute name the package's code reads, outside the config's own modules."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() in ("training/config.py", "training/keys.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
    return frozenset(names)


def test_every_key_has_a_probe():
    assert set(KEYS) == set(PROBES), "give a new config key a probe value (and a rule if it does not always apply)"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_key_is_used_or_refused_for_every_family_and_mode(family, tmp_path):
    model_dir = tmp_path / "missing-tiny-model"  # built from model.tiny when the run starts
    outcomes = {}
    for mode in MODES:
        for method in METHODS:
            base = base_overrides(family, mode, method, model_dir)
            base_cfg = load_config(None, base)
            assert not judge_keys(base_cfg, families.FAMILIES[family]).refused
            try:
                reference = resolved_budget(base_cfg, family)
            except UserError:
                continue  # a compressor this family's tower cannot feed: tests/families/test_compressor_families.py
            keys = KEYS if method == "visionzip" else BUDGET_KEYS  # only the budget's keys depend on the compressor
            for key in keys:
                value = value_of(key, family, method, mode, model_dir)
                cfg = load_config(None, [*base, f"{key}={value}"])
                outcome = verdict(cfg, key, family)
                expected = "used" if applies(key, family, mode, method) else "refused"
                assert outcome == expected, f"{key}={value} ({family}, {mode}, {method}): {outcome}"
                if outcome == "used":
                    assert_used(key, cfg, base_cfg, family, reference)
                outcomes[key, mode, method] = outcome
    assert "used" in outcomes.values() and "refused" in outcomes.values()


def assert_used(key: str, cfg: Config, base_cfg: Config, family: str, reference: dict) -> None:
    """The effect of a key judged used: on the recorded budget, on the tiny model built, or read by the code."""
    if key.startswith("visionzip.") and key not in ("visionzip.enabled", "visionzip.method"):
        assert resolved_budget(cfg, family) != reference, f"{key} must change the budget {family} records"
    elif key.startswith("model.tiny.") and key not in ("model.tiny.family", "model.tiny.seed"):
        # (the seed draws the weights only: tests/demo/test_tiny.py)
        assert tiny_build(cfg.model.tiny) != tiny_build(base_cfg.model.tiny), f"{key} must change the tiny model"
    else:
        assert key.rsplit(".", 1)[1] in package_attributes(), f"nothing in the package reads {key}"


@pytest.mark.parametrize(("switch", "dependents"), SWITCHES, ids=[switch for switch, _ in SWITCHES])
def test_a_switch_turned_off_refuses_the_keys_it_governs_and_drops_the_recipe_s(switch, dependents, tmp_path):
    base = ["model.name_or_path=/nonexistent", "model.build_tiny_if_missing=true", "data.build_demo_if_missing=true"]
    base += ["data.eval_path=data/eval.json", "logging.wandb=true", "train.feature_cache=cache/x"]
    llava = families.FAMILIES["llava"]
    assert not judge_keys(load_config(None, [*base, *dependents]), llava).refused
    refused = judge_keys(load_config(None, [*base, *dependents, switch]), llava).refused
    assert sorted(line.split("=")[0] for line in refused) == sorted(key.split("=")[0] for key in dependents)
    assert all(switch.split("=")[0] in line for line in refused), refused
    # The same keys in a recipe: the command line's switch wins, and each reason is one notice line.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_nested_yaml([*base, *dependents]))
    cfg = load_config(recipe, [switch])
    judged = judge_keys(cfg, llava)
    notices = [*cfg.notices, *judged.notices]  # (the run's length and the budget's kind are resolved at load)
    assert not judged.refused and notices and all(line.startswith("notice: ") and "\n" not in line for line in notices)
    noticed = " ".join(notices)
    assert all(key.split("=")[0] in noticed for key in dependents) and "dropped" in noticed


def _nested_yaml(overrides: list[str]) -> str:
    import yaml

    tree: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        *sections, name = key.split(".")
        branch = tree
        for section in sections:
            branch = branch.setdefault(section, {})
        branch[name] = yaml.safe_load(value)
    return yaml.safe_dump(tree)


def test_the_issue_s_reproduction_is_refused_naming_the_counts_and_the_ratios_to_set(tmp_path):
    """issue #22: `bash train.sh model.tiny.family=qwen2_5_vl model.name_or_path=DIR visionzip.dominant=12
    visionzip.contextual=4` trained without a word about the budget."""
    demo = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "demo.yaml"
    cfg = load_config(
        demo,
        [
            "model.tiny.family=qwen2_5_vl",
            f"model.name_or_path={tmp_path / 'q'}",
            "visionzip.dominant=12",
            "visionzip.contextual=4",
        ],
    )
    with pytest.raises(UserError) as err:
        check_keys(cfg)
    message = str(err.value)
    assert "visionzip.dominant=12 (override 'visionzip.dominant=12') does not apply" in message
    assert "visionzip.contextual=4" in message and "visionzip.dominant_ratio and visionzip.contextual_ratio" in message
    assert "\n" not in message and not (tmp_path / "q").exists()


def test_a_tiny_key_that_differs_from_the_model_on_disk_is_refused(tmp_path):
    """The model on disk is used as it is: a model.tiny key that would have built another one is refused."""
    model_dir = tmp_path / "tiny"
    save_tiny(model_dir, TinySpec(image_size=56, vision_layers=2))
    same = ["model.build_tiny_if_missing=true", f"model.name_or_path={model_dir}", "model.tiny.image_size=56"]
    same += ["model.tiny.vision_layers=2", "visionzip.dominant=6", "visionzip.contextual=2"]
    assert check_keys(load_config(None, same)).name == "llava"
    with pytest.raises(UserError) as err:
        check_keys(load_config(None, [*same, "model.tiny.vision_layers=3"]))
    assert "was built with vision_layers=2 and is used as it is" in str(err.value)
