"""An original Mini-Gemini (MGM) checkpoint -> a transformers-5 directory
(:class:`~visionzip_tune.models.mini_gemini.MiniGeminiForConditionalGeneration`, tokenizer, image processor) that
``AutoModelForImageTextToText.from_pretrained`` loads after ``import visionzip_tune``.

Input: MGM's ``config.json`` (LLaMA keys plus ``mm_*`` keys), its weights in one file or in shards with an index
(safetensors or ``.bin``), and ``tokenizer.json`` or a sentencepiece ``tokenizer.model`` (which needs the
``visionzip-tune[sentencepiece]`` extra). Only configurations that MGM's own code computes the way the model here
does are accepted; anything else (another projector type, CLS features, start/end image tokens, a non-LLaMA LLM, a
key or shape that does not fit) is a :class:`~visionzip_tune.errors.UserError` naming it, raised before anything is
written; the output directory appears complete or not at all.

Vision towers. MGM checkpoints normally hold both towers (``model.vision_tower.vision_tower.*``,
``model.vision_tower_aux.vision_stem/vision_stages.*``). When one is absent, ``--clip DIR`` (a transformers CLIP
save, e.g. ``openai/clip-vit-large-patch14-336``) and ``--convnext FILE`` (LAION's open_clip file, keys
``visual.trunk.*``) supply it; the towers the config names (``mm_vision_tower``, ``mm_vision_tower_aux``) serve the
same way when those paths exist locally. Geometry is never assumed to be ViT-L / ConvNeXt-L: CLIP's comes from the
tower directory's ``config.json`` when there is one, else from the weight shapes (with OpenAI CLIP's 64-wide heads
and quick-GELU, the two things shapes cannot tell); ConvNeXt's always comes from the weight shapes.

Vocabulary, as llava-hf's conversions do: the tokenizer gets an ``<image>`` token (and ``<pad>`` when it has no pad
token), and ``embed_tokens`` / ``lm_head`` grow to the next multiple of 64 rows when the new tokens do not fit. The
new rows are the mean of the old ones (llava-hf samples them from a normal distribution around that mean with a
1e-5 scaled covariance; the mean is its deterministic centre). The ``<image>`` row is never read: its positions
receive image features. All weights are stored in the dtype of the checkpoint's ``embed_tokens``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import AddedToken
from torch import Tensor
from transformers import AutoTokenizer, CLIPVisionConfig, ConvNextConfig, LlamaConfig, PreTrainedConfig

from visionzip_tune.errors import UserError
from visionzip_tune.files import atomic_dir
from visionzip_tune.models.mini_gemini.configuration_mini_gemini import MiniGeminiConfig
from visionzip_tune.models.mini_gemini.image_processing_mini_gemini import build_image_processor
from visionzip_tune.models.mini_gemini.modeling_mini_gemini import (
    MGM_PROJECTOR_NAMES,
    MiniGeminiForConditionalGeneration,
)
from visionzip_tune.models.weight_files import Tensors, read_json, weight_files

_OPEN_CLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
_CLIP_PREFIX = "model.vision_tower.vision_tower."
_AUX_PREFIX = "model.vision_tower_aux."
_EMBED = "model.embed_tokens.weight"
_VOCAB_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")  # rows padded for the new tokens
# Buffers older transformers releases saved and current ones recompute at load.
_OBSOLETE_BUFFERS = (".rotary_emb.inv_freq", ".embeddings.position_ids")
# MGM config values this converter reproduces exactly; anything else changes the computation.
_REQUIRED_VALUES = {
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_feature": "patch",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "image_aspect_ratio": "pad",
}
_REQUIRED_INTS = ("mm_vision_select_layer", "mm_hidden_size", "mm_hidden_size_aux", "image_size_aux")
_LISTED = 8  # keys named per kind of problem in an error message


# ----------------------------------------------------------------------------------------------------------------
# Weight names, MGM <-> the model here. MGM's are those of its LLaMA-based checkpoints (mgm/model/mgm_arch.py,
# language_model/mgm_llama.py, timm ConvNeXt names under vision_stem / vision_stages). "{s}" stands for a number,
# a trailing "*" for the rest of the key. Read in both directions: MGM -> model here, and back in error messages.

_AUX = "model.vision_tower_aux"
_MGM_BLOCK = _AUX + ".vision_stages.{s}.blocks.{b}"
_HF_BLOCK = _AUX + ".encoder.stages.{s}.layers.{b}"
KEY_PATTERNS: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.*", "model.language_model.embed_tokens.*"),
    ("model.layers.*", "model.language_model.layers.*"),
    ("model.norm.*", "model.language_model.norm.*"),
    ("lm_head.*", "lm_head.*"),
    # The projector set (MLP + mining), as the family exports it to MGM's names.
    *((mgm + "*", f"model.{hf}*") for hf, mgm in MGM_PROJECTOR_NAMES.items()),
    ("model.vision_tower.vision_tower.vision_model.*", "model.vision_tower.*"),
    (_AUX + ".vision_stem.0.*", _AUX + ".embeddings.patch_embeddings.*"),
    (_AUX + ".vision_stem.1.*", _AUX + ".embeddings.layernorm.*"),
    (_AUX + ".vision_stages.{s}.downsample.{i}.*", _AUX + ".encoder.stages.{s}.downsampling_layer.{i}.*"),
    (_MGM_BLOCK + ".gamma", _HF_BLOCK + ".layer_scale_parameter"),
    (_MGM_BLOCK + ".conv_dw.*", _HF_BLOCK + ".dwconv.*"),
    (_MGM_BLOCK + ".norm.*", _HF_BLOCK + ".layernorm.*"),
    (_MGM_BLOCK + ".mlp.fc1.*", _HF_BLOCK + ".pwconv1.*"),
    (_MGM_BLOCK + ".mlp.fc2.*", _HF_BLOCK + ".pwconv2.*"),
)


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern).replace(r"\*", r"(?P<rest>.+)")
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", regex) + "$")


_TO_HF = [(_compile(mgm), hf.replace("*", "{rest}")) for mgm, hf in KEY_PATTERNS]
_TO_MGM = [(_compile(hf), mgm.replace("*", "{rest}")) for mgm, hf in KEY_PATTERNS]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        if match := pattern.match(key):
            return target.format(**match.groupdict())
    return None


def to_hf_key(mgm_key: str) -> str | None:
    """``model.mm_projector.0.weight`` -> ``model.multi_modal_projector.linear_1.weight``; None if not MGM's."""
    return _rename(mgm_key, _TO_HF)


def to_mgm_key(hf_key: str) -> str | None:
    """The inverse of :func:`to_hf_key` (full-model names, ``model.`` prefix included)."""
    return _rename(hf_key, _TO_MGM)


def _open_clip_files(source: Path) -> list[Path]:
    """The open_clip weights of ``--convnext`` (a file) or of the tower directory MGM's config names."""
    if source.is_file():
        return [source]
    for name in _OPEN_CLIP_FILES:
        if (source / name).is_file():
            return [source / name]
    raise UserError(f"{source} holds no open_clip weights ({' or '.join(_OPEN_CLIP_FILES)})")


def _clip_source_key(key: str) -> str | None:
    """A CLIP save's vision-tower key under MGM's name (text tower and projections dropped). Takes the
    ``vision_model.`` keys of ``CLIPModel`` and older ``CLIPVisionModel`` saves and the flat keys of current ones."""
    key = key.removeprefix("vision_model.")
    if key.split(".", 1)[0] in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm"):
        return f"{_CLIP_PREFIX}vision_model.{key}"
    return None


def _convnext_source_key(key: str) -> str | None:
    """An open_clip ConvNeXt key under MGM's name: MGM keeps the trunk's stem and stages, nothing else."""
    for part in ("stem", "stages"):
        if key.startswith(f"visual.trunk.{part}."):
            return f"{_AUX_PREFIX}vision_{part}." + key.removeprefix(f"visual.trunk.{part}.")
    return None


@dataclasses.dataclass(frozen=True)
class TowerSource:
    """One vision tower: its keys in an MGM checkpoint, and how a separate copy of it supplies them."""

    label: str
    prefix: str  # of its keys in an MGM checkpoint
    flag: str  # the command-line option that supplies it
    files: Callable[[Path], list[Path]]  # the weight files of a separate copy
    rename: Callable[[str], str | None]  # a separate copy's key -> MGM's name (None: not the tower's)


_CLIP = TowerSource(
    "CLIP", _CLIP_PREFIX, "--clip", lambda source: weight_files(source, "the CLIP tower"), _clip_source_key
)
_CONVNEXT = TowerSource("ConvNeXt", _AUX_PREFIX, "--convnext", _open_clip_files, _convnext_source_key)


def _named_path(checkpoint: Path, name: str | None) -> Path | None:
    """The tower path MGM's config names, when it exists here (as given, or relative to the checkpoint)."""
    if not name:
        return None
    return next((path for path in (Path(name), checkpoint / name) if path.exists()), None)


def _add_tower(tensors: Tensors, tower: TowerSource, source: Path | None, explicit: bool, checkpoint: Path) -> None:
    """Take the tower's weights from ``source`` (``explicit``: given by its flag) when the checkpoint lacks them;
    refuse them twice."""
    if tensors.names(tower.prefix):
        if explicit:
            raise UserError(
                f"{checkpoint} already holds the {tower.label} tower's weights ({tower.prefix}*); drop {tower.flag}, "
                "which is only for checkpoints without them"
            )
        return
    if source is None:
        raise UserError(
            f"{checkpoint} has no {tower.label} tower weights ({tower.prefix}*) and no local copy of the tower its "
            f"config names: pass {tower.flag}"
        )
    for path in tower.files(source):
        tensors.add(path, tower.rename)
    if not tensors.names(tower.prefix):
        raise UserError(f"{source} holds no {tower.label} vision-tower weights")


def gather_weights(
    checkpoint: Path, mgm: dict, clip: Path | None, convnext: Path | None
) -> tuple[Tensors, Path | None]:
    """Every tensor of the checkpoint, plus the towers it lacks, under MGM's names. Returns them and the CLIP tower
    directory in use (``--clip`` or the one the config names), whose config.json then gives CLIP's geometry."""
    for source in (clip, convnext):
        if source is not None and not source.exists():
            raise UserError(f"{source} does not exist")
    tensors = Tensors()
    for path in weight_files(checkpoint, "the checkpoint"):
        tensors.add(path)
    clip_source = clip or _named_path(checkpoint, mgm.get("mm_vision_tower"))
    _add_tower(tensors, _CLIP, clip_source, clip is not None, checkpoint)
    convnext_source = convnext or _named_path(checkpoint, mgm.get("mm_vision_tower_aux"))
    _add_tower(tensors, _CONVNEXT, convnext_source, convnext is not None, checkpoint)
    if _EMBED not in tensors.names():
        raise UserError(f"{checkpoint} has no {_EMBED}: not a LLaMA-based MGM checkpoint")
    return tensors, clip_source


# ----------------------------------------------------------------------------------------------------------------
# Configuration.


def check_mgm_config(config: dict, path: Path) -> None:
    """UserError naming every value of MGM's ``config.json`` that this converter cannot reproduce exactly."""
    problems = []
    if config.get("model_type") != "mgm":
        problems.append(
            f"model_type={config.get('model_type')!r} (only LLaMA-based MGM, model_type 'mgm', is supported: "
            "MGM-7B/13B/8B/34B and their HD variants)"
        )
    for key, expected in _REQUIRED_VALUES.items():
        if key not in config:
            problems.append(f"{key} is missing (expected {expected!r})")
        elif config[key] != expected:
            problems.append(f"{key}={config[key]!r} (expected {expected!r})")
    for key in _REQUIRED_INTS:
        if isinstance(config.get(key), bool) or not isinstance(config.get(key), int):
            problems.append(f"{key}={config.get(key)!r} (expected an int)")
    if problems:
        raise UserError(f"{path} is not a Mini-Gemini configuration this converter reproduces: {'; '.join(problems)}")


def clip_config_from_weights(shapes: dict[str, tuple[int, ...]]) -> CLIPVisionConfig:
    """CLIP geometry from the shapes of its weights (keys relative to ``vision_model.``).

    Shapes give the width, depth, MLP width, patch and image size; not the head count or the activation: those are
    OpenAI CLIP's (64-wide heads, quick-GELU), the towers MGM builds on (mgm/model/multimodal_encoder/builder.py).
    """
    hidden = shapes["embeddings.class_embedding"][0]
    patch = shapes["embeddings.patch_embedding.weight"][-1]
    side = math.isqrt(shapes["embeddings.position_embedding.weight"][0] - 1)
    layers = 1 + max(int(m[1]) for key in shapes if (m := re.match(r"encoder\.layers\.(\d+)\.", key)))
    if hidden % 64:
        raise UserError(
            f"the CLIP tower is {hidden} wide, not a multiple of OpenAI CLIP's 64-wide heads, so its head count "
            "cannot be read from the weights: pass --clip DIR with the tower's config.json"
        )
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        image_size=side * patch,
        patch_size=patch,
        hidden_act="quick_gelu",
    )


def convnext_config_from_weights(shapes: dict[str, tuple[int, ...]]) -> ConvNextConfig:
    """ConvNeXt geometry (stem stride, stage widths and depths) from the shapes of MGM's ``vision_stem`` /
    ``vision_stages`` weights (keys relative to ``vision_tower_aux``). Kernel 7 and the 4x MLP are ConvNeXt's."""
    depths: dict[int, int] = {}
    for key in shapes:
        if m := re.match(r"vision_stages\.(\d+)\.blocks\.(\d+)\.", key):
            depths[int(m[1])] = max(depths.get(int(m[1]), 0), int(m[2]) + 1)
    stages = sorted(depths)
    if not stages or stages != list(range(len(stages))):
        raise UserError(f"the ConvNeXt weights have stages {stages}; expected stages 0, 1, 2, ... with blocks")
    return ConvNextConfig(
        patch_size=shapes["vision_stem.0.weight"][-1],
        num_stages=len(stages),
        hidden_sizes=[shapes[f"vision_stages.{s}.blocks.0.conv_dw.weight"][0] for s in stages],
        depths=[depths[s] for s in stages],
    )


def tower_configs(tensors: Tensors, clip_source: Path | None) -> tuple[CLIPVisionConfig, ConvNextConfig]:
    """The towers' geometry, announced on stdout with where CLIP's came from."""
    try:
        if clip_source is not None and (clip_source / "config.json").is_file():
            vision, origin = CLIPVisionConfig.from_pretrained(clip_source), str(clip_source / "config.json")
        else:
            vision = clip_config_from_weights(tensors.shapes(_CLIP_PREFIX + "vision_model."))
            origin = "the weight shapes (OpenAI CLIP's 64-wide heads and quick-GELU assumed)"
        aux = convnext_config_from_weights(tensors.shapes(_AUX_PREFIX))
    except KeyError as err:
        raise UserError(f"a vision tower lacks the weight {err.args[0]}, which its geometry is read from") from err
    print(
        f"[convert] CLIP geometry from {origin}: {vision.num_hidden_layers} layers x {vision.hidden_size}, "
        f"{vision.image_size} px / patch {vision.patch_size}; ConvNeXt from its weights: widths "
        f"{aux.hidden_sizes}, depths {aux.depths}"
    )
    return vision, aux


def text_config(config: dict) -> LlamaConfig:
    """The LLaMA config inside MGM's: its own keys (MGM's config *is* a LlamaConfig plus ``mm_*`` keys; LlamaConfig
    converts the rope keys of transformers 4)."""
    own = {f.name for f in dataclasses.fields(LlamaConfig)} - {f.name for f in dataclasses.fields(PreTrainedConfig)}
    own |= {"rope_theta"} | ({"rope_scaling"} if config.get("rope_scaling") else set())
    return LlamaConfig(**{k: v for k, v in config.items() if k in own})


def model_config(mgm: dict, path: Path, vision, aux, llm: LlamaConfig, tokenizer) -> MiniGeminiConfig:
    """The MiniGeminiConfig of an MGM config and the towers' geometry; UserError when they disagree."""
    for key, width in (("mm_hidden_size", vision.hidden_size), ("mm_hidden_size_aux", sum(aux.hidden_sizes))):
        if mgm[key] != width:
            raise UserError(f"{path} says {key}={mgm[key]} but the vision tower's weights are {width} wide")
    try:
        return MiniGeminiConfig(
            vision_config=vision,
            aux_vision_config=aux,
            text_config=llm,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=mgm["mm_vision_select_layer"],
            pad_token_id=tokenizer.pad_token_id,
            image_size_aux=mgm["image_size_aux"],
            image_grid=mgm.get("image_grid", 1),
            image_global=mgm.get("image_global", False),
        )
    except ValueError as err:
        raise UserError(f"{path}: {err}") from err


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and vocabulary.


def load_tokenizer(checkpoint: Path, llm_config: LlamaConfig):
    """The checkpoint's tokenizer from ``tokenizer.json``, or converted from sentencepiece's ``tokenizer.model``.
    ``llm_config`` stands in for MGM's config.json, whose model_type transformers does not know."""
    if not (checkpoint / "tokenizer.json").is_file():
        if not (checkpoint / "tokenizer.model").is_file():
            raise UserError(f"{checkpoint} has no tokenizer: expected tokenizer.json or tokenizer.model")
        problem = sentencepiece_problem()
        if problem is not None:
            raise UserError(
                f"{checkpoint} has a sentencepiece tokenizer.model and no tokenizer.json; {problem} (or put the "
                "tokenizer.json of the same LLM, e.g. from its llava-hf release, next to it)"
            )
    return AutoTokenizer.from_pretrained(checkpoint, config=llm_config)


def sentencepiece_problem() -> str | None:
    """Why transformers cannot read a sentencepiece ``tokenizer.model`` in this environment, or None. Without a
    working reader transformers falls back to reading the file as tiktoken's, with a misleading error."""
    if importlib.util.find_spec("sentencepiece") is None or importlib.util.find_spec("google.protobuf") is None:
        return (
            "converting it needs the sentencepiece and protobuf packages: pip install 'visionzip-tune[sentencepiece]'"
        )
    try:
        importlib.import_module("sentencepiece.sentencepiece_model_pb2")  # the reader transformers uses
    except Exception as err:  # protobuf's version check: sentencepiece 0.2.3's reader needs protobuf >= 7.36
        return (
            f"sentencepiece's model reader does not load beside this protobuf ({' '.join(str(err).split())}): "
            "pip install -U protobuf, or where protobuf must stay below 7 (wandb 0.25, which lmms-eval 0.7.3 pins) "
            "pip install 'sentencepiece<0.2.3'"
        )
    return None


def add_image_token(tokenizer) -> None:
    """Add ``<image>``, and ``<pad>`` if the tokenizer has no pad token, as llava-hf's conversions do."""
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})


def padded_rows(rows: int, tokens: int) -> int:
    """Embedding rows for ``tokens`` tokens: unchanged if they fit, else the next multiple of 64 (llava-hf's)."""
    return rows if tokens <= rows else -(-tokens // 64) * 64


def pad_rows(weight: Tensor, rows: int) -> Tensor:
    """(V, H) -> (rows, H): the new rows are the mean of the old ones (computed in fp32)."""
    extra = rows - weight.shape[0]
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)]) if extra > 0 else weight


# ----------------------------------------------------------------------------------------------------------------
# Weights.


def match_names(tensors: Tensors, expected: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """{model name: MGM name} for every tensor; UserError naming the missing, unexpected and mis-shaped keys (in
    MGM's names). The vocabulary matrices may have fewer rows than the model's (they are padded)."""
    mapped, unexpected, mismatched = {}, [], []
    for name in tensors.names():
        target = to_hf_key(name)
        if target in expected:
            mapped[target] = name
        elif not name.endswith(_OBSOLETE_BUFFERS):
            unexpected.append(name)
    for target, name in mapped.items():
        have, want = tensors.shape(name), expected[target]
        fits = have[1:] == want[1:] and have[0] <= want[0] if target in _VOCAB_KEYS else have == want
        if not fits:
            mismatched.append(f"{name} {list(have)} vs {list(want)}")
    missing = [to_mgm_key(target) or target for target in expected if target not in mapped]
    kinds = (("missing", missing), ("unexpected", unexpected), ("shape mismatch, checkpoint vs model", mismatched))
    problems = [
        f"{kind} ({len(keys)}): {', '.join(keys[:_LISTED])}{' ...' if len(keys) > _LISTED else ''}"
        for kind, keys in kinds
        if keys
    ]
    if problems:
        raise UserError(f"the weights do not fit the Mini-Gemini model their config describes: {'; '.join(problems)}")
    return mapped


def load_state(tensors: Tensors, mapped: dict[str, str], rows: int) -> dict[str, Tensor]:
    """The model's state dict: every tensor in the dtype of ``embed_tokens`` (towers from --clip / --convnext may be
    stored in another), the vocabulary matrices padded to ``rows``."""
    dtype = tensors.tensor(_EMBED).dtype
    target_of = {name: target for target, name in mapped.items()}
    state = {}
    for name, tensor in tensors.load(list(target_of)):
        target = target_of[name]
        state[target] = pad_rows(tensor.to(dtype), rows) if target in _VOCAB_KEYS else tensor.to(dtype)
    return state


def convert_mini_gemini(checkpoint: Path, output: Path, clip: Path | None = None, convnext: Path | None = None) -> Path:
    """Convert the MGM checkpoint directory ``checkpoint`` into ``output`` (written atomically). Returns ``output``."""
    if output.exists():
        raise UserError(f"{output} already exists; remove it or choose another --output")
    mgm = read_json(checkpoint / "config.json")
    check_mgm_config(mgm, checkpoint / "config.json")
    tensors, clip_source = gather_weights(checkpoint, mgm, clip, convnext)
    vision, aux = tower_configs(tensors, clip_source)
    llm = text_config(mgm)
    tokenizer = load_tokenizer(checkpoint, llm)
    add_image_token(tokenizer)
    llm.vocab_size = rows = padded_rows(tensors.shape(_EMBED)[0], len(tokenizer))
    llm.pad_token_id = tokenizer.pad_token_id
    config = model_config(mgm, checkpoint / "config.json", vision, aux, llm, tokenizer)

    with torch.device("meta"):  # names and shapes only: the real tensors are assigned below
        model = MiniGeminiForConditionalGeneration(config)
    mapped = match_names(tensors, {name: tuple(t.shape) for name, t in model.state_dict().items()})
    model.load_state_dict(load_state(tensors, mapped, rows), strict=True, assign=True)
    with atomic_dir(output) as tmp:
        print(f"[convert] writing {output}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        build_image_processor(config.image_size_aux).save_pretrained(tmp)
    return output
