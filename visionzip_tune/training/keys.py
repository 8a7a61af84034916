"""Every config key set by the recipe or on the command line takes effect, or stops the run before anything is
written: the keys that only mean something for some families, modes, compressors or other settings, each with
the condition under which it applies (:data:`RULES`), and :func:`judge_keys`, which applies one rule to every key
set:

- a key that does not apply stops the run, in one paragraph naming each such key, its value, where it was set,
  why it does not apply and what to do instead;
- unless it came from the recipe and applied to the recipe alone: then a command-line key turned it off
  (``model.build_tiny_if_missing=false`` beside a recipe's ``model.tiny``, ``train.max_steps`` beside its
  ``train.epochs``, ``visionzip.enabled=false`` beside its budget), the command line wins and the recipe's key is
  dropped with a one-line notice, as :func:`~visionzip_tune.training.config.load_config` drops a recipe's budget
  of another kind than the command line's.

Keys no rule names apply to every run (the loop reads them unconditionally); keys whose *value* can be wrong for
a family (``train.projector_modules``, ``visionzip.token_order``, a budget too large for the tower) are refused by
the checks that resolve them. ``tests/training/test_keys.py`` walks every key against every family and mode.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from visionzip_tune.algorithm.compressors import COMPRESSORS
from visionzip_tune.demo.tiny import TinySpec, recorded_spec
from visionzip_tune.errors import ERROR_DIR_ENV, UserError
from visionzip_tune.families import Family
from visionzip_tune.training.config import Config, overridden


@dataclass(frozen=True)
class Run:
    """What decides whether a key applies: the config and the family of its model."""

    cfg: Config
    family: Family

    @property
    def method(self) -> str:
        return self.cfg.visionzip.method

    @property
    def counts(self) -> bool:
        """Whether the family takes VisionZip's budget in tokens per unit (else ratios: Qwen)."""
        return "dominant" in self.family.budget.keys


@dataclass(frozen=True)
class Rule:
    """Keys (a trailing dot: every key of a section) that apply only when ``problem(run)`` is None; else it says
    why not and what to do instead ("...: set X instead", "...: leave it out")."""

    keys: tuple[str, ...]
    problem: Callable[[Run], str | None]


def _unless(condition: Callable[[Run], bool], message: Callable[[Run], str]) -> Callable[[Run], str | None]:
    return lambda run: None if condition(run) else message(run)


# ---------------------------------------------------------------------------------------------------------------
# The budget: VisionZip's counts (LLaVA families) or ratios (Qwen), or another compressor's tokens and parameters


def _budget_taken(run: Run) -> str:
    """What the run takes as its budget, and the keys to set for it."""
    if run.method != "visionzip":
        params = "".join(f", visionzip.{key}" for key in COMPRESSORS[run.method].parameters if key != "tokens")
        return (
            f"visionzip.method={run.method} takes visionzip.tokens (rows per unit){params}: set those instead, or "
            "visionzip.method=visionzip"
        )
    if run.counts:
        return (
            f"{run.family.model_class} takes VisionZip's budget in tokens per image: set visionzip.dominant and "
            "visionzip.contextual instead (e.g. 54 and 10 for 64 tokens)"
        )
    return (
        f"{run.family.model_class} takes VisionZip's budget as ratios of each image's merged tokens: set "
        "visionzip.dominant_ratio and visionzip.contextual_ratio instead (e.g. 0.45 and 0.05 for 50%)"
    )


def _compressor_parameter_rules() -> list[Rule]:
    """One rule per compressor parameter: the compressors that read it."""
    readers: dict[str, list[str]] = {}
    for name, compressor in COMPRESSORS.items():
        for key in compressor.parameters:
            if key != "tokens" and name != "visionzip":
                readers.setdefault(key, []).append(name)
    return [
        Rule(
            (f"visionzip.{key}",),
            _unless(
                lambda run, names=tuple(names): run.method in names,
                lambda run, names=tuple(names): (
                    f"only the {' and '.join(names)} compressor reads it, and visionzip.method={run.method}: set "
                    f"visionzip.method={names[0]}, or leave it out"
                ),
            ),
        )
        for key, names in readers.items()
    ]


# ---------------------------------------------------------------------------------------------------------------
# model.tiny: how to build a missing tiny model


# The TinySpec fields only some families' builders read (model.tiny.tower=null, the family's own, suits every one).
TINY_FAMILIES = {
    "crop_grids": ("llava_next", "llava_onevision"),
    "hd": ("mini_gemini",),
    "tower": ("llava", "llava_next", "video_llava", "llava_onevision", "mini_gemini"),
}


def _tiny_problem(name: str) -> Callable[[Run], str | None]:
    """Why ``model.tiny.<name>`` would do nothing: no tiny model is built, the family's builder does not read it,
    or the model already on disk was built with another value (it is used as it is)."""

    def problem(run: Run) -> str | None:
        model, spec = run.cfg.model, run.cfg.model.tiny
        if not model.build_tiny_if_missing:
            return "model.build_tiny_if_missing=false: no tiny model is built: set it to true, or leave the key out"
        families = TINY_FAMILIES.get(name)
        if families is not None and spec.family not in families and getattr(spec, name) is not None:
            return f"a tiny {spec.family} model has no such choice (only {', '.join(families)}): leave it out"
        recorded = recorded_spec(model.name_or_path) if Path(model.name_or_path).exists() else None
        if recorded is not None and recorded.get(name) != getattr(spec, name):
            return (
                f"the tiny model in {model.name_or_path} (model.name_or_path) was built with "
                f"{name}={recorded.get(name)!r} and is used as it is: delete that directory to rebuild it, choose "
                "another model.name_or_path, or leave the key out"
            )
        return None

    return problem


# ---------------------------------------------------------------------------------------------------------------
# The table

RULES: list[Rule] = [
    Rule(
        ("visionzip.",),
        _unless(
            lambda run: run.cfg.visionzip.enabled,
            lambda run: (
                "visionzip.enabled=false feeds the LLM every stock token, so no budget applies: set "
                "visionzip.enabled=true, or leave the key out"
            ),
        ),
    ),
    Rule(
        ("visionzip.dominant", "visionzip.contextual"),
        _unless(lambda run: run.method == "visionzip" and run.counts, _budget_taken),
    ),
    Rule(
        ("visionzip.dominant_ratio", "visionzip.contextual_ratio"),
        _unless(lambda run: run.method == "visionzip" and not run.counts, _budget_taken),
    ),
    Rule(("visionzip.tokens",), _unless(lambda run: run.method != "visionzip", _budget_taken)),
    *_compressor_parameter_rules(),
    Rule(
        ("visionzip.eager", "visionzip.token_order"),
        _unless(
            lambda run: "eager" in run.family.knob_keys,
            lambda run: (
                f"{run.family.model_class} captures its tower on its own attention, in one token order: leave it out"
            ),
        ),
    ),
    Rule(
        ("visionzip.merge_space",),
        _unless(
            lambda run: "merge_space" in run.family.knob_keys,
            lambda run: (
                f"only the Qwen families merge around a patch merger; {run.family.model_class} has none: leave it out"
            ),
        ),
    ),
    Rule(
        ("train.lora_r", "train.lora_alpha", "train.lora_dropout"),
        _unless(
            lambda run: run.cfg.train.mode == "lora",
            lambda run: f"train.mode={run.cfg.train.mode} trains no LoRA adapter: set train.mode=lora, or leave it out",
        ),
    ),
    Rule(
        ("train.lr",),
        _unless(
            lambda run: run.cfg.train.mode != "projector" or run.cfg.train.projector_lr is None,
            lambda run: (
                "in projector mode every trainable parameter is the projector's, whose rate train.projector_lr sets "
                f"({run.cfg.train.projector_lr}): set one of train.lr and train.projector_lr"
            ),
        ),
    ),
    Rule(
        ("train.epochs",),
        _unless(
            lambda run: run.cfg.train.max_steps is None,
            lambda run: (
                f"train.max_steps={run.cfg.train.max_steps} sets the run's length: set one of train.max_steps and "
                "train.epochs"
            ),
        ),
    ),
    Rule(
        ("train.eval_every", "train.eval_batch_size", "data.eval_image_folder"),
        _unless(
            lambda run: run.cfg.data.eval_path is not None,
            lambda run: "there is no held-out set (data.eval_path is null): set data.eval_path, or leave it out",
        ),
    ),
    Rule(
        ("train.feature_cache_build",),
        _unless(
            lambda run: run.cfg.train.feature_cache is not None,
            lambda run: (
                "there is no feature cache to build (train.feature_cache is null): set train.feature_cache, "
                "or leave it out"
            ),
        ),
    ),
    Rule(
        ("data.video_folder", "data.video_frames"),
        _unless(
            lambda run: run.family.has_video,
            lambda run: (
                f"{run.family.model_class} has no video input: leave it out, or train a family with one "
                "(video_llava, llava_onevision, qwen2_5_vl, qwen3_vl)"
            ),
        ),
    ),
    Rule(
        ("data.demo_samples", "data.demo_seed", "data.demo_videos"),
        _unless(
            lambda run: run.cfg.data.build_demo_if_missing,
            lambda run: "data.build_demo_if_missing=false: no demo dataset is built: set it to true, or leave it out",
        ),
    ),
    *(Rule((f"model.tiny.{field.name}",), _tiny_problem(field.name)) for field in dataclasses.fields(TinySpec)),
    Rule(
        ("deepspeed.offload_optimizer",),
        _unless(
            lambda run: run.cfg.deepspeed.zero_stage > 0,
            lambda run: "deepspeed.zero_stage=0 keeps no ZeRO optimizer state to offload: set zero_stage 1 to 3",
        ),
    ),
    Rule(
        ("logging.wandb_project", "logging.wandb_run_name"),
        _unless(
            lambda run: run.cfg.logging.wandb,
            lambda run: (
                "logging.wandb=false: nothing is logged to Weights & Biases: set logging.wandb=true, or leave it out"
            ),
        ),
    ),
]


# ---------------------------------------------------------------------------------------------------------------
# Judging the keys set


def _covers(rule_key: str, key: str) -> bool:
    """Whether a rule's key names ``key``: itself, or a section (trailing dot) holding it, less the section's
    ``enabled`` switch (which always applies: it is what turns the section off)."""
    if rule_key.endswith("."):
        return key.startswith(rule_key) and key != f"{rule_key}enabled"
    return key == rule_key


def problem_of(key: str, run: Run) -> str | None:
    """Why ``key`` does not take effect in ``run`` (the first rule naming it that fails), or None."""
    for rule in RULES:
        if any(_covers(rule_key, key) for rule_key in rule.keys):
            problem = rule.problem(run)
            if problem is not None:
                return problem
    return None


def _value(cfg: Config, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


@dataclass
class Verdict:
    """The keys set that do not take effect: ``refused`` (one clause each: key, value, source, why, what instead)
    and ``notices`` (recipe keys a command-line key turned off, dropped: one line per reason)."""

    refused: list[str]
    notices: list[str]


def judge_keys(cfg: Config, family: Family) -> Verdict:
    """Every key set by the recipe or on the command line (``cfg.sources``) against :data:`RULES`, by the rule of
    this module's docstring; ``family`` is the family of the run's model."""
    run = Run(cfg, family)
    recipe_run = Run(cfg.from_recipe, family) if cfg.from_recipe is not None else None
    refused: list[str] = []
    dropped: dict[str, list[str]] = {}
    for key, source in cfg.sources.items():
        problem = problem_of(key, run)
        if problem is None:
            continue
        if not overridden(source) and recipe_run is not None and problem_of(key, recipe_run) is None:
            dropped.setdefault(problem, []).append(key)
        else:
            refused.append(f"{key}={_value(cfg, key)!r} ({source}) does not apply: {problem}")
    notices = [
        f"notice: {', '.join(keys)} ({cfg.sources[keys[0]]}) dropped, the command line wins: {problem}"
        for problem, keys in dropped.items()
    ]
    return Verdict(refused, notices)


def refuse_unused_keys(cfg: Config, family: Family) -> list[str]:
    """:class:`UserError`, one paragraph, naming every key set that would not take effect (see :func:`judge_keys`);
    else the notices of the recipe keys the command line dropped."""
    verdict = judge_keys(cfg, family)
    if verdict.refused:
        raise UserError(
            f"{len(verdict.refused)} config key(s) would be silently ignored by this run of a {family.model_class}: "
            + "; ".join(verdict.refused)
            + ". Every key set by the recipe or on the command line takes effect or stops the run (README: Recipes)."
        )
    return verdict.notices


def print_notices(notices: Sequence[str]) -> None:
    """Notices, once: by the launcher and by rank 0 of a plain run, not again by the ranks a launcher starts (they
    run under its error folder)."""
    if os.environ.get(ERROR_DIR_ENV) or int(os.environ.get("RANK", "0")) != 0:
        return
    for notice in notices:
        print(notice, file=sys.stderr, flush=True)
