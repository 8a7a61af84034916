"""Tiny random LLaVA models with a locally built tokenizer: for the demo recipe, tests and benches.

Nothing here downloads anything. The tokenizer is a byte-fallback BPE trained in memory on a small corpus (the
vicuna_v1 system prompt, the demo data's vocabulary), shaped like Llama's: ``<unk>``=0, ``<s>``=1, ``</s>``=2, a
``<s>`` prepended to every encoded text, ``<image>`` and ``<pad>`` as added special tokens. The model is a real
``LlavaForConditionalGeneration`` with a CLIP or SigLIP tower and a Llama LLM, randomly initialised from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Vocabulary the BPE is trained on; text outside it still encodes (byte fallback), just into more tokens.
_CORPUS = [
    VICUNA_SYSTEM,
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
PAD_TOKEN = "<pad>"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tokenizer(extra_corpus: list[str] | None = None, vocab_size: int = 600):
    """A Llama-shaped fast tokenizer trained locally; deterministic for the same corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

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
    fast.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": [IMAGE_TOKEN]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass(frozen=True)
class TinySpec:
    """Geometry of a tiny LLaVA. Defaults give 224 px / patch 14 = 256 patches (+ CLS for CLIP)."""

    tower: str = "clip"  # "clip" | "siglip"
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


def build_config(spec: TinySpec, vocab_size: int, image_token_id: int, pad_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig

    vision_kwargs = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    if spec.tower == "clip":
        vision = CLIPVisionConfig(projection_dim=spec.vision_hidden, **vision_kwargs)
        strategy, layer = "default", -2
    elif spec.tower == "siglip":
        vision = SiglipVisionConfig(**vision_kwargs)
        strategy, layer = "full", -1
    else:
        raise ValueError(f"unknown tower {spec.tower!r}; expected 'clip' or 'siglip'")
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 4,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
        initializer_range=spec.text_init_std,
    )
    n_patches = (spec.image_size // spec.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        image_seq_length=n_patches,
        pad_token_id=pad_token_id,
    )


def build_processor(spec: TinySpec, tokenizer):
    from transformers import CLIPImageProcessorPil, LlavaProcessor, SiglipImageProcessorPil

    size = spec.image_size
    if spec.tower == "clip":
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        strategy, extra = "default", 1
    else:
        image_processor = SiglipImageProcessorPil(size={"height": size, "width": size})
        strategy, extra = "full", 0
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llava(spec: TinySpec = TinySpec(), extra_corpus: list[str] | None = None):
    """Return ``(model, processor)``: a random LlavaForConditionalGeneration (fp32, eval mode) and its processor."""
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tokenizer(extra_corpus)
    config = build_config(
        spec,
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlavaForConditionalGeneration(config)
    model.eval()
    return model, build_processor(spec, tokenizer)


def save_tiny_llava(out_dir: str | Path, spec: TinySpec = TinySpec(), extra_corpus: list[str] | None = None) -> Path:
    """Build a tiny LLaVA and ``save_pretrained`` model + processor into ``out_dir`` (written atomically)."""
    from visionzip_tune.files import atomic_dir

    model, processor = build_tiny_llava(spec, extra_corpus)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)
