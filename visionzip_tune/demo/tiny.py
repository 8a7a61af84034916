"""Tiny random VLMs of every supported family with a locally built tokenizer: for the demo recipe, tests and benches.

Nothing here downloads anything. The tokenizer is a byte-fallback BPE trained in memory on a small corpus (the vicuna_v1
system prompt, the demo data's vocabulary), shaped like Llama's: ``<unk>``=0, ``<s>``=1, ``</s>``=2, a ``<s>`` prepended
to every encoded text, ``<pad>``, ``<image>`` (and ``<video>`` for families with a video input) as added special tokens.
The model is a real transformers model of the family :attr:`TinySpec.family` names (LLaVA, LLaVA-NeXT, Video-LLaVA,
LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL, and this package's native Mini-Gemini), randomly initialised from a seed, built
by that family's :class:`Builder` (:data:`BUILDERS`, one per family of the registry); the LLaVA families share one tower
config (CLIP or SigLIP) and one Llama LLM config, so they differ only where their architectures do (Mini-Gemini adds a
tiny ConvNeXt as its high-resolution tower). The Qwen families are their own towers and LLMs at the spec's widths, with
Qwen's special tokens (``<|image_pad|>``, ``<|video_pad|>``, ``<|vision_start|>``, ``<|vision_end|>``, ``<|im_start|>``,
``<|im_end|>``) and a Qwen-style chat template.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    ConvNextConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    VideoLlavaConfig,
    VideoLlavaImageProcessor,
)

from visionzip_tune.data.config import DEFAULT_VIDEO_FRAMES
from visionzip_tune.data.template import VICUNA_V1_SYSTEM
from visionzip_tune.errors import UserError
from visionzip_tune.families import FAMILIES
from visionzip_tune.files import atomic_dir
from visionzip_tune.models.mini_gemini import MiniGeminiConfig
from visionzip_tune.models.mini_gemini import build_image_processor as mini_gemini_image_processor

# Vocabulary the BPE is trained on; text outside it still encodes (byte fallback), just into more tokens.
_CORPUS = [
    VICUNA_V1_SYSTEM,
    "USER: ASSISTANT: Human: Assistant: system user assistant",
    "What colour is the background? What color is the shape? What shape is in the image? How many shapes are there?",
    "Is there a circle? Is there a square? Is there a triangle? Where is the shape? Which side? Answer with one word.",
    "red green blue yellow purple orange white black gray grey pink brown cyan",
    "circle square triangle star rectangle ellipse cross shapes shape object objects",
    "one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9",
    "yes no left right top bottom center middle upper lower corner",
    "the a an is are there in on of and to it this that image picture photo describe please with answer word",
    "Tell me a short story. Write a haiku about the sea. What is the capital of France? Paris.",
    "Sure! Here is a short answer. I do not know. The answer is",
]

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
PAD_TOKEN = "<pad>"

TinyFamily = Literal[tuple(FAMILIES)]  # any family of the registry

QWEN_MEDIA_TOKENS = ("<|image_pad|>", "<|video_pad|>")
QWEN_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# Qwen's chat layout (<|im_start|>role\n...<|im_end|>\n, media between vision start / end tokens), written for the
# tiny models; no system turn is added.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Geometry of a tiny random VLM for the demo, tests and benches. Defaults give a LLaVA with 224 px / patch 14 =
    256 patches (+ CLS for CLIP)."""

    family: TinyFamily = "llava"
    tower: Literal["clip", "siglip"] | None = None  # None: the family's own (SigLIP for OneVision, else CLIP)
    # the tower's input side: the whole image (LLaVA), one crop (anyres) or one frame; Qwen: the largest image side
    # the image processor keeps (max_pixels = image_size squared)
    image_size: int = 224
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    seed: int = 0
    # Std of the LLM's (and projector's) random init. transformers' 0.02 suits ~4096-wide LLMs (about 1.3/sqrt(d));
    # a 64-wide frozen LLM initialised that way has logits within about +-1 that a projector can hardly steer, so
    # the demo uses ~1/sqrt(text_hidden) (recipes/tiny/demo.yaml).
    text_init_std: float = 0.02
    # Anyres families: the grids of crops ("rows x columns", space separated) an image may be tiled into; HF's
    # image_grid_pinpoints are these times image_size (see image_grid_pinpoints()).
    crop_grids: str = "1x2 2x1 2x2"
    # Mini-Gemini: MGM-HD's layout (2 x 2 crops + a global view, on an HR image twice as large) instead of MGM's.
    hd: bool = False


def build_tokenizer(
    extra_corpus: list[str] | None = None,
    vocab_size: int = 600,
    media_tokens: tuple[str, ...] = (IMAGE_TOKEN,),
    *,
    special_tokens: tuple[str, ...] = (),
    chat_template: str = CHAT_TEMPLATE,
    eos_token: str = "</s>",
):
    """A Llama-shaped fast tokenizer trained locally; deterministic for the same corpus. ``media_tokens`` become
    added special tokens after ``<pad>``, in that order (``<image>``, then ``<video>`` for video families), then
    ``special_tokens``; ``eos_token`` ends an answer (Qwen: ``<|im_end|>``)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS + list(extra_corpus or []), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=2048,
    )
    fast.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": [*media_tokens, *special_tokens]})
    fast.eos_token = eos_token
    fast.chat_template = chat_template
    return fast


def llava_tokenizer(extra_corpus: list[str] | None = None, *, video: bool = False):
    """``<image>`` (and ``<video>`` for a family with a video input) with the vicuna-style :data:`CHAT_TEMPLATE`."""
    return build_tokenizer(extra_corpus, media_tokens=(IMAGE_TOKEN, VIDEO_TOKEN) if video else (IMAGE_TOKEN,))


def qwen_tokenizer(extra_corpus: list[str] | None = None):
    """Qwen's special tokens and chat layout (:data:`QWEN_CHAT_TEMPLATE`), ``<|im_end|>`` ending an answer."""
    return build_tokenizer(
        extra_corpus,
        media_tokens=QWEN_MEDIA_TOKENS,
        special_tokens=QWEN_SPECIAL_TOKENS,
        chat_template=QWEN_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
    )


# OneVision's stock layout downscales an anyres grid bigger than this many crops' worth (its release uses 9); 4 lets
# a tiny 3x3 grid reach that branch.
ONEVISION_ASPECT_RATIO = "anyres_max_4"
# Mini-Gemini's HR tower: four stages like ConvNeXt-L (120 channels in all). Layer scale 1: at ImageNet's 1e-6 the
# random blocks would be near-identities and the stage outputs would barely depend on them.
MINI_GEMINI_AUX = {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 2, 1], "layer_scale_init_value": 1.0}
MINI_GEMINI_REGION_SIDE = 4  # HR vectors per LR token and side (MGM-7B: 8)


def tower_name(spec: TinySpec) -> str:
    """The tower the spec builds: ``spec.tower``, or the family's own (its builder's)."""
    return spec.tower if spec.tower is not None else BUILDERS[spec.family].tower


def mini_gemini_image_size_aux(spec: TinySpec) -> int:
    """The HR image side of a tiny Mini-Gemini: ConvNeXt's stride 4 x one region per LR patch per side x the grid
    (2 for HD), so that every LR token mines MINI_GEMINI_REGION_SIDE² HR vectors."""
    grid = 2 if spec.hd else 1
    stride = ConvNextConfig(**MINI_GEMINI_AUX).patch_size  # the stem's stride: stage 0 of the HR map
    return stride * (spec.image_size // spec.patch_size) * MINI_GEMINI_REGION_SIDE * grid


def image_grid_pinpoints(spec: TinySpec) -> list[list[int]]:
    """``crop_grids`` as HF's ``image_grid_pinpoints``: [[height, width], ...] in pixels, multiples of image_size.
    A malformed ``crop_grids`` (it comes from ``model.tiny`` in a recipe) is a :class:`UserError`."""
    pinpoints = []
    for grid in spec.crop_grids.split():
        rows, sep, cols = grid.partition("x")
        if not (sep and rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
            raise UserError(
                f"model.tiny.crop_grids (TinySpec.crop_grids) = {spec.crop_grids!r}: {grid!r} is not a grid of "
                "crops 'ROWSxCOLUMNS' with positive numbers; give space-separated grids, e.g. '1x2 2x1 2x2'"
            )
        pinpoints.append([int(rows) * spec.image_size, int(cols) * spec.image_size])
    if not pinpoints:
        raise UserError(
            "model.tiny.crop_grids (TinySpec.crop_grids) is empty: give at least one grid of crops, e.g. '1x2 2x1 2x2'"
        )
    return pinpoints


def _tower_config(spec: TinySpec):
    """(vision config, select strategy, feature layer, extra tokens besides patches) of the spec's tower: CLIP keeps
    CLS and feeds layer -2 without it, as LLaVA does; SigLIP has no CLS and feeds every token of layer -1."""
    shape = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    tower = tower_name(spec)
    if tower == "clip":
        return CLIPVisionConfig(projection_dim=spec.vision_hidden, **shape), "default", -2, 1
    if tower == "siglip":
        return SiglipVisionConfig(**shape), "full", -1, 0
    raise ValueError(f"unknown tower {tower!r}; expected 'clip' or 'siglip'")


def _text_widths(spec: TinySpec, tokenizer) -> dict:
    """The LLM config keys every tiny family shares: the spec's widths over the tokenizer's vocabulary."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 4,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=2048,
        initializer_range=spec.text_init_std,  # the projector's init reads it too (no top-level initializer_range)
        pad_token_id=tokenizer.pad_token_id,
    )


def _text_config(spec: TinySpec, tokenizer):
    return LlamaConfig(**_text_widths(spec, tokenizer), bos_token_id=1, eos_token_id=2)


def _mrope_section(head_dim: int) -> list[int]:
    """(t, h, w) rotary frequency counts over a head's head_dim / 2 frequencies, split as Qwen2.5-VL-7B splits
    its 64 (16, 24, 24)."""
    half = head_dim // 2
    spatial = 3 * half // 8
    return [half - 2 * spatial, spatial, spatial]


def build_qwen_config(spec: TinySpec, tokenizer):
    """A ``Qwen2_5_VLConfig`` or ``Qwen3VLConfig`` at the spec's widths: patches of ``patch_size`` merged 2 x 2,
    images up to ``image_size`` px square. Qwen2.5-VL: windows of 2 x 2 merged tokens in every block but the last
    (full attention, where VisionZip scores). Qwen3-VL: DeepStack after the first blocks, one per LLM layer at most
    (the LLM adds DeepStack feature i after its layer i)."""
    ids = tokenizer.convert_tokens_to_ids
    head_dim = spec.text_hidden // spec.text_heads
    text = dict(
        **_text_widths(spec, tokenizer),
        bos_token_id=None,  # Qwen prepends no BOS
        eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)},
    )
    vision = dict(
        depth=spec.vision_layers,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=spec.text_hidden,
        initializer_range=spec.text_init_std,
    )
    common = dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    if spec.family == "qwen2_5_vl":  # windows in every block but the last
        vision.update(
            window_size=2 * 2 * spec.patch_size, fullatt_block_indexes=[spec.vision_layers - 1], tokens_per_second=2
        )
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **common)
    text.update(head_dim=head_dim)
    text["rope_parameters"]["mrope_interleaved"] = True
    deepstack = list(range(min(spec.vision_layers - 1, spec.text_layers)))
    vision.update(num_position_embeddings=(spec.image_size // spec.patch_size) ** 2, deepstack_visual_indexes=deepstack)
    return Qwen3VLConfig(vision_config=vision, text_config=text, **common)


def _llava_common(spec: TinySpec, tokenizer) -> dict:
    """The config keys the LLaVA-style families share: the spec's tower and LLM, the tokenizer's ids."""
    vision, strategy, layer, _ = _tower_config(spec)
    return dict(
        vision_config=vision,
        text_config=_text_config(spec, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        pad_token_id=tokenizer.pad_token_id,
    )


def _patches(spec: TinySpec) -> int:
    return (spec.image_size // spec.patch_size) ** 2


def _llava_config(spec: TinySpec, tokenizer) -> LlavaConfig:
    return LlavaConfig(image_seq_length=_patches(spec), **_llava_common(spec, tokenizer))


def _llava_next_config(spec: TinySpec, tokenizer) -> LlavaNextConfig:
    return LlavaNextConfig(
        image_grid_pinpoints=image_grid_pinpoints(spec),
        image_seq_length=_patches(spec),
        **_llava_common(spec, tokenizer),
    )


def _video_llava_config(spec: TinySpec, tokenizer) -> VideoLlavaConfig:
    return VideoLlavaConfig(
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_seq_length=_patches(spec),
        video_seq_length=DEFAULT_VIDEO_FRAMES * (_patches(spec) + 1),  # stock Video-LLaVA keeps CLS in every frame
        **_llava_common(spec, tokenizer),
    )


def _llava_onevision_config(spec: TinySpec, tokenizer) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_grid_pinpoints=image_grid_pinpoints(spec),
        vision_aspect_ratio=ONEVISION_ASPECT_RATIO,
        **_llava_common(spec, tokenizer),
    )


def build_config(spec: TinySpec, tokenizer):
    """The family's config (``LlavaConfig``, ``LlavaNextConfig``, ``VideoLlavaConfig``, ``LlavaOnevisionConfig``,
    ``MiniGeminiConfig``, or a Qwen one: :func:`build_qwen_config`) around the shared tower and LLM configs, with the
    tokenizer's ``<image>`` / ``<video>`` / ``<pad>`` ids."""
    return BUILDERS[spec.family].config(spec, tokenizer)


def _mini_gemini_config(spec: TinySpec, tokenizer) -> MiniGeminiConfig:
    """MGM's layout (or MGM-HD's, ``spec.hd``) around the shared CLIP tower and LLM, with a tiny ConvNeXt."""
    if tower_name(spec) != "clip":
        raise UserError(
            f"model.tiny.tower={spec.tower!r}: a tiny mini_gemini needs a CLIP tower (Mini-Gemini mines CLIP patch "
            "tokens, CLS first); set model.tiny.tower=clip or null"
        )
    return MiniGeminiConfig(
        aux_vision_config=ConvNextConfig(**MINI_GEMINI_AUX),
        image_size_aux=mini_gemini_image_size_aux(spec),
        image_grid=2 if spec.hd else 1,
        image_global=spec.hd,
        **_llava_common(spec, tokenizer),
    )


def _square(spec: TinySpec) -> dict[str, int]:
    return {"height": spec.image_size, "width": spec.image_size}


def _llava_image_processor(spec: TinySpec):
    if tower_name(spec) == "clip":
        return CLIPImageProcessorPil(size={"shortest_edge": spec.image_size}, crop_size=_square(spec))
    return SiglipImageProcessorPil(size=_square(spec))


def _qwen_image_processor(spec: TinySpec):
    """Images resized to whole merged tokens, at least 2 x 2 of them and at most ``image_size`` px squared."""
    merged = 2 * spec.patch_size
    return Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=(2 * merged) ** 2,
        max_pixels=spec.image_size**2,
    )


def build_image_processor(spec: TinySpec):
    """The family's PIL image processor at the spec's geometry (no torchvision needed)."""
    return BUILDERS[spec.family].image_processor(spec)


def build_processor(spec: TinySpec, tokenizer):
    """The multimodal processor (``LlavaProcessor`` / ``LlavaNextProcessor``) of the spec's image processor and
    ``tokenizer``. Video-LLaVA's and OneVision's processors cannot be built here (their video processor needs
    torchvision): ValueError; use the tokenizer and :func:`build_image_processor` instead, as the data path does."""
    processor_class = BUILDERS[spec.family].processor
    if processor_class is None:
        raise ValueError(
            f"the {spec.family} processor class needs torchvision (its video processor); tiny {spec.family} models "
            "come with a tokenizer and an image processor instead (build_tiny, save_tiny)"
        )
    _, strategy, _, extra = _tower_config(spec)
    return processor_class(
        image_processor=build_image_processor(spec),
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra,
        chat_template=CHAT_TEMPLATE,
    )


class Builder(NamedTuple):
    """How the tiny model of one family is made."""

    config: Callable[[TinySpec, object], object]  # (spec, tokenizer) -> the model's config
    image_processor: Callable[[TinySpec], object]
    tokenizer: Callable[[list[str] | None], object]  # (extra corpus) -> the tokenizer
    tower: Literal["clip", "siglip"] = "clip"  # the tower when TinySpec.tower is null
    # The multimodal processor class, where it can be built here (Video-LLaVA's and OneVision's build a video
    # processor that needs torchvision): save_tiny saves it whole, so AutoProcessor works on those directories.
    processor: type | None = None


def _video_tokenizer(extra_corpus: list[str] | None = None):
    return llava_tokenizer(extra_corpus, video=True)


def _llava_next_image_processor(spec: TinySpec):
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size=_square(spec),
        image_grid_pinpoints=image_grid_pinpoints(spec),
    )


# One builder per family of the registry (tests/demo/test_tiny.py checks that they are the same families).
BUILDERS: dict[str, Builder] = {
    "llava": Builder(_llava_config, _llava_image_processor, llava_tokenizer, processor=LlavaProcessor),
    "llava_next": Builder(
        _llava_next_config, _llava_next_image_processor, llava_tokenizer, processor=LlavaNextProcessor
    ),
    "video_llava": Builder(
        _video_llava_config,
        lambda spec: VideoLlavaImageProcessor(size={"shortest_edge": spec.image_size}, crop_size=_square(spec)),
        _video_tokenizer,
    ),
    "llava_onevision": Builder(
        _llava_onevision_config,
        lambda spec: LlavaOnevisionImageProcessorPil(
            size=_square(spec), image_grid_pinpoints=image_grid_pinpoints(spec)
        ),
        _video_tokenizer,
        tower="siglip",
    ),
    "qwen2_5_vl": Builder(build_qwen_config, _qwen_image_processor, qwen_tokenizer),
    "qwen3_vl": Builder(build_qwen_config, _qwen_image_processor, qwen_tokenizer),
    "mini_gemini": Builder(
        _mini_gemini_config,
        lambda spec: mini_gemini_image_processor(mini_gemini_image_size_aux(spec)),
        llava_tokenizer,
    ),
}


def _model_and_tokenizer(spec: TinySpec, extra_corpus: list[str] | None):
    """The random model (fp32, eval mode, weights a function of ``spec.seed``) and its tokenizer."""
    tokenizer = BUILDERS[spec.family].tokenizer(extra_corpus)
    config = build_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForImageTextToText.from_config(config)
    return model.eval(), tokenizer


def build_tiny(spec: TinySpec = TinySpec(), extra_corpus: list[str] | None = None):
    """Return ``(model, tokenizer, image_processor)``: a random model of ``spec.family`` (fp32, eval mode), its
    tokenizer (chat template :data:`CHAT_TEMPLATE`) and its PIL image processor."""
    model, tokenizer = _model_and_tokenizer(spec, extra_corpus)
    return model, tokenizer, build_image_processor(spec)


def save_tiny(out_dir: str | Path, spec: TinySpec = TinySpec(), extra_corpus: list[str] | None = None) -> Path:
    """Build a tiny model of ``spec.family`` and ``save_pretrained`` it into ``out_dir`` (written atomically) with
    what :func:`visionzip_tune.processing.load_processing` reads: the whole processor for LLaVA and LLaVA-NeXT (so
    ``AutoProcessor`` works too), the tokenizer (with the chat template) and image processor for the others; and
    the spec it was built from (:data:`TINY_SPEC_FILE`)."""
    model, tokenizer = _model_and_tokenizer(spec, extra_corpus)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if BUILDERS[spec.family].processor is not None:
            build_processor(spec, tokenizer).save_pretrained(tmp)
        else:
            tokenizer.save_pretrained(tmp)
            build_image_processor(spec).save_pretrained(tmp)
        (Path(tmp) / TINY_SPEC_FILE).write_text(json.dumps(dataclasses.asdict(spec), indent=2) + "\n")
    return Path(out_dir)


# The spec a saved tiny model was built from: a run that finds the model on disk uses it as it is, so its
# model.tiny keys must be the spec's (training.keys refuses a key that differs, which would otherwise do nothing).
TINY_SPEC_FILE = "tiny_spec.json"


def recorded_spec(model_dir: str | Path) -> dict | None:
    """The spec a tiny model in ``model_dir`` was built from, as :func:`save_tiny` recorded it; None when there is
    no such record (no model there, a model not built here, or one built before the record existed)."""
    path = Path(model_dir) / TINY_SPEC_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def build_tiny_with_processor(spec: TinySpec = TinySpec(), extra_corpus: list[str] | None = None):
    """Return ``(model, processor)``: a random LLaVA or LLaVA-NeXT (per ``spec.family``; fp32, eval mode) and its
    multimodal processor (see :func:`build_processor`)."""
    model, tokenizer = _model_and_tokenizer(spec, extra_corpus)
    return model, build_processor(spec, tokenizer)
