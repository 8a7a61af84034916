"""Capture of one vision-tower layer for VisionZip: its output plus the queries and keys of its self-attention.

The tower keeps its configured attention (SDPA): rather than asking for attention maps (which needs eager
attention in every layer and keeps every layer's map), forward hooks on layer L's ``q_proj``/``k_proj`` record the
projections, registered for one call and removed after it, even when it raises. The encoder stops after layer L,
since later layers cannot change layer L's output.

Supported towers (transformers 5): ``CLIPVisionModel`` (CLS token, pre-layernorm) and ``SiglipVisionModel``
(no CLS). Both hold ``embeddings`` and ``encoder.layers`` directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

from torch import Tensor, nn


class TowerFacts(NamedTuple):
    model_type: str  # the tower config's model_type
    has_cls: bool  # whether token 0 is a CLS token
    pre_norm: str | None  # the norm between the embeddings and layer 0, by attribute name (CLIP's pre_layrnorm)


# Tower class name -> its config type and token layout. LLaVA-style models build their tower from the config
# with AutoModel, so these classes are what they hold.
_TOWERS = {
    "CLIPVisionModel": TowerFacts("clip_vision_model", has_cls=True, pre_norm="pre_layrnorm"),
    "SiglipVisionModel": TowerFacts("siglip_vision_model", has_cls=False, pre_norm=None),
}


class LayerCapture(NamedTuple):
    """Layer L of a tower for a batch. hidden, queries, keys: (B, N, D); ``scale`` = head_dim ** -0.5."""

    hidden: Tensor
    queries: Tensor
    keys: Tensor
    num_heads: int
    scale: float
    has_cls: bool


def _tower_facts(tower: nn.Module) -> TowerFacts:
    name = type(tower).__name__
    if name not in _TOWERS:
        raise ValueError(
            f"VisionZip does not support the vision tower class {name}; supported towers: {', '.join(_TOWERS)}"
        )
    return _TOWERS[name]


def tower_has_cls(tower: nn.Module) -> bool:
    """Whether the tower's token 0 is a CLS token; a tower of an unsupported class raises ``ValueError``."""
    return _tower_facts(tower).has_cls


def config_has_cls(vision_config) -> bool:
    """Whether a tower of this config has a CLS token (``ValueError`` for an unsupported tower type)."""
    return _kind_of_config(vision_config).has_cls


def _kind_of_config(vision_config) -> TowerFacts:
    kinds = {tower.model_type: tower for tower in _TOWERS.values()}
    if vision_config.model_type not in kinds:
        raise ValueError(
            f"VisionZip does not support vision towers of type {vision_config.model_type!r}; supported types: "
            f"{', '.join(kinds)}"
        )
    return kinds[vision_config.model_type]


def tokens_per_tower_output(vision_config) -> int:
    """N: tokens the tower emits per image (patches, plus CLS for CLIP), from its config alone."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + int(_kind_of_config(vision_config).has_cls)


def resolve_layer(num_layers: int, vision_feature_layer) -> int:
    """Encoder layer index of ``hidden_states[vision_feature_layer]`` (entry 0 is the embeddings).

    LLaVA's -2 is the output of the second-to-last layer: ``resolve_layer(24, -2) == 22``. List-valued layers
    (multi-layer feature concat) and the embeddings (no attention to score with) raise ``ValueError``.
    """
    if isinstance(vision_feature_layer, bool) or not isinstance(vision_feature_layer, int):
        raise ValueError(
            f"VisionZip needs a single vision_feature_layer (an int); got {vision_feature_layer!r}. Multi-layer "
            f"feature concatenation is not supported"
        )
    if not -(num_layers + 1) <= vision_feature_layer <= num_layers:
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} is out of range for a tower with {num_layers} layers "
            f"({num_layers + 1} hidden states)"
        )
    index = vision_feature_layer % (num_layers + 1)
    if index == 0:
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} selects the embeddings (hidden_states[0]), which have no "
            f"self-attention to score tokens with; pick an encoder layer"
        )
    return index - 1


@contextlib.contextmanager
def capture_qk(attention: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record ``attention.q_proj`` / ``k_proj`` outputs into the yielded dict (keys "q", "k") for one call.

    The hooks live on this module instance only and are removed on exit, whatever happens inside.
    """
    store: dict[str, Tensor] = {}
    handles = [
        getattr(attention, f"{name}_proj").register_forward_hook(
            lambda module, args, output, name=name: store.__setitem__(name, output)
        )
        for name in ("q", "k")
    ]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


class Call(NamedTuple):
    """One module call as a forward hook sees it: positional args, keyword args, output."""

    args: tuple
    kwargs: dict[str, Any]
    output: Any


@contextlib.contextmanager
def record_calls(modules: dict[str, nn.Module]) -> Iterator[dict[str, Call]]:
    """Record the last call of each module into the yielded dict, by the name given (towers whose layers take their
    attention segments and rotary embeddings as keyword arguments, such as Qwen's, need the keywords).

    The hooks live on these module instances only and are removed on exit, whatever happens inside.
    """
    store: dict[str, Call] = {}
    handles = [
        module.register_forward_hook(
            lambda _, args, kwargs, output, name=name: store.__setitem__(name, Call(args, kwargs, output)),
            with_kwargs=True,
        )
        for name, module in modules.items()
    ]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def attention_implementation(tower: nn.Module, implementation: str | None) -> Iterator[None]:
    """Run the tower with another attention implementation for the duration (``None``: leave it alone).

    Attention layers read ``config._attn_implementation`` at every call, so switching the tower's config and
    restoring it afterwards changes only calls made inside this block.
    """
    if implementation is None:
        yield
        return
    previous = tower.config._attn_implementation
    tower.config._attn_implementation = implementation
    try:
        yield
    finally:
        tower.config._attn_implementation = previous


def run_until(tower: nn.Module, pixel_values: Tensor, layer: int, *, eager: bool = False) -> LayerCapture:
    """Run ``tower`` up to and including encoder layer ``layer`` and capture that layer.

    pixel_values: (B, 3, H, W), cast to the tower's dtype. ``eager=True`` runs the layers with eager attention
    (bit-exact with an ``output_attentions`` run of the same tower); otherwise the configured one (SDPA) is kept.
    Call under ``torch.no_grad()`` unless gradients through the tower are wanted.
    """
    facts = _tower_facts(tower)
    layers = tower.encoder.layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"encoder layer {layer} does not exist in a tower with {len(layers)} layers")
    attention = layers[layer].self_attn
    with attention_implementation(tower, "eager" if eager else None), capture_qk(attention) as store:
        hidden = tower.embeddings(pixel_values.to(tower.embeddings.patch_embedding.weight.dtype))
        if facts.pre_norm is not None:
            hidden = getattr(tower, facts.pre_norm)(hidden)
        for encoder_layer in layers[: layer + 1]:
            hidden = encoder_layer(hidden, None)
    return LayerCapture(hidden, store["q"], store["k"], attention.num_heads, attention.scale, facts.has_cls)
