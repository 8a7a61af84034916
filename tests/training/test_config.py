"""Config tree: defaults <- recipe YAML <- overrides; strict keys and types with clear messages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import visionzip_tune
from visionzip_tune.docfields import resume_safe_keys
from visionzip_tune.training.config import Config, describe, load_config, to_yaml
from visionzip_tune.errors import UserError
from visionzip_tune.demo.tiny import TinySpec


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_recipe_and_overrides_layer_in_order(tmp_path):
    recipe = write(tmp_path, "train:\n  lr: 1.0e-3\n  mode: full\nvisionzip:\n  dominant: 108\n")
    cfg = load_config(recipe, ["train.lr=5e-4", "visionzip.contextual=20", "deepspeed.bf16=false"])
    assert cfg.train.lr == 5e-4  # override beats recipe; "5e-4" (YAML string) read as the number meant
    assert cfg.train.mode == "full"  # recipe beats default
    assert (cfg.visionzip.dominant, cfg.visionzip.contextual) == (108, 20)
    assert cfg.deepspeed.bf16 is False
    assert cfg.train.micro_batch_size == 16  # untouched default


def test_keys_the_issue_names_exist():
    cfg = load_config()
    for key in [
        "model.name_or_path",
        "visionzip.enabled",
        "visionzip.dominant",
        "visionzip.contextual",
        "data.path",
        "data.image_folder",
        "data.template",
        "train.mode",
        "train.max_steps",
        "train.epochs",
        "train.micro_batch_size",
        "train.grad_accum",
        "train.lr",
        "train.projector_lr",
        "train.warmup_ratio",
        "train.save_every",
        "train.resume",
        "train.seed",
        "deepspeed.zero_stage",
        "logging.wandb",
        "output.dir",
    ]:
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key
    assert cfg.train.resume == "auto"


def test_every_field_has_a_doc():
    rows = describe()
    assert len(rows) > 40
    assert all(doc.strip() for _, _, _, doc in rows), [key for key, _, _, doc in rows if not doc.strip()]


def test_nested_tiny_spec_and_null():
    cfg = load_config(None, ["model.tiny.image_size=112", "train.projector_lr=2e-5", "train.projector_lr=null"])
    assert cfg.model.tiny == TinySpec(image_size=112)
    assert cfg.train.projector_lr is None


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["train.mode=lora", "model.tiny.text_layers=3", "output.dir=runs/x"])
    again = load_config(write(tmp_path, to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", ["unknown config key 'train.lrr'", "Did you mean 'train.lr'?", "projector_lr", "max_steps"]),
        ("trian.lr=1", ["unknown config key 'trian'", "Did you mean 'train'?", "deepspeed"]),
        ("model.tiny.image_sise=3", ["'model.tiny.image_sise'", "Did you mean 'model.tiny.image_size'?"]),
    ],
)
def test_unknown_key_names_valid_keys_and_close_match(override, expected):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    for part in expected:
        assert part in str(err.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=fast", "'train.lr' in override 'train.lr=fast' expects a number, got 'fast'"),
        ("train.micro_batch_size=2.5", "'train.micro_batch_size'"),
        ("visionzip.enabled=1", "'visionzip.enabled' in override 'visionzip.enabled=1' expects true or false"),
        ("deepspeed.zero_stage=4", "expects one of 0, 1, 2, 3, got 4"),
        ("train.mode=everything", "expects one of 'projector', 'full', 'lora'"),
        ("train=3", "'train' in override 'train=3' is a section"),
        ("train.lr", "is not of the form key.sub=value"),
        ("train.warmup_ratio=1.5", "'train.warmup_ratio' must be in [0, 1)"),
        ("train.micro_batch_size=0", "'train.micro_batch_size' must be positive"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_recipe_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="recipe .*missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match=r"recipe .*recipe.yaml is not valid YAML"):
        load_config(write(tmp_path, "train: [1, 2\n"))
    with pytest.raises(UserError, match=r"unknown config key 'train.epoch' in recipe .*recipe.yaml"):
        load_config(write(tmp_path, "train:\n  epoch: 3\n"))
    with pytest.raises(UserError, match=r"'train.epochs' in recipe .*recipe.yaml expects an integer"):
        load_config(write(tmp_path, "train:\n  epochs: three\n"))


def _annotated_names_twice(tree: ast.AST) -> list[str]:
    """``Class.name`` for every name a class body annotates more than once (a dataclass keeps one field, in the
    first position, with the last default and metadata: the first declaration's doc silently vanishes)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            names = [stmt.target.id for stmt in node.body if isinstance(stmt, ast.AnnAssign)]
            found += [f"{node.name}.{name}" for name in sorted(set(names)) if names.count(name) > 1]
    return found


def test_no_config_dataclass_declares_a_field_twice():
    assert _annotated_names_twice(ast.parse("class A:\n    x: int = 1\n    y: int = 2\n    x: int = 3\n")) == ["A.x"]
    package = Path(visionzip_tune.__file__).parent
    twice = [
        f"{path.relative_to(package)}: {name}"
        for path in package.rglob("*.py")
        for name in _annotated_names_twice(ast.parse(path.read_text()))
    ]
    assert twice == []


def test_projector_modules_doc_names_every_family_subset():
    doc = {key: doc for key, _, _, doc in describe()}["train.projector_modules"]
    assert "'merger'" in doc and "'mlp_only'" in doc


def test_resume_safe_keys_are_declared_on_the_fields():
    safe = resume_safe_keys(Config)
    assert {"logging.wandb", "output.dir", "data.path", "train.eval_every", "model.tiny"} <= safe
    assert not {"train.lr", "visionzip.dominant", "data.template", "train.micro_batch_size"} & safe
    # Anything a key names with its doc is declared where it is documented: no section is wholesale safe.
    assert all(key.count(".") == 1 for key in safe)
