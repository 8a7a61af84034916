"""Where inference time goes, read from the model's own forward pass: hooks mark the start and end of every stage
on the device's timeline while ``model.generate`` runs, nothing is re-implemented.

Stages (each call's span; a stage called several times, e.g. image and video, is summed):

* ``vision``: the inner model's ``get_image_features`` / ``get_video_features`` (stock or VisionZip override):
  tower + VisionZip + projector; with VisionZip on Qwen also ``get_rope_index``, which encodes the media first;
* ``tower``: each vision tower from its embeddings to the last layer it runs (stock runs them all; VisionZip
  stops at the feature layer; Qwen's merger is the projector's);
* ``projector``: the projector modules;
* ``llm``: every language-model call, the first being the prefill and the others one decode step each;
* ``head``: the end of every LM-head call, i.e. the moment each new token's logits exist.

On a GPU the marks are CUDA events, read after one synchronisation (no sync inside the pass); on a CPU they are
``time.perf_counter`` values, which are exact there because every op runs synchronously.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator

import torch
from torch import nn

from visionzip_tune.families import family_of, language_model, projector_modules, unwrap_peft, vision_towers

FEATURE_METHODS = ("get_image_features", "get_video_features")


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, ``perf_counter`` seconds on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Marks:
    """The marks of one instrumented pass: ``spans[stage]`` = [start, end] per call, ``head`` = end per call."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.spans: dict[str, list[list]] = {"vision": [], "tower": [], "projector": [], "llm": []}
        self.head: list = []

    def open(self, stage: str) -> None:
        self.spans[stage].append([self.clock.mark(), None])

    def close(self, stage: str) -> None:
        self.spans[stage][-1][1] = self.clock.mark()

    def total_ms(self, stage: str) -> float:
        """Summed span of every call of ``stage`` (read after ``clock.sync()``)."""
        return sum(self.clock.ms(start, end) for start, end in self.spans[stage])


class FirstToken:
    """The time from entering :func:`first_token` to the first LM-head output inside it (``ms``, set on exit)."""

    ms: float | None = None


@contextlib.contextmanager
def first_token(model: nn.Module) -> Iterator[FirstToken]:
    """Time to first token of the ``generate`` call(s) in the block, as the model measures it: from entering the block
    to the end of its first LM-head call (the first token's logits), on the device's timeline (:class:`Clock`); one
    hook, removed on exit. Read ``ms`` after the block (None when no token was computed)."""
    clock = Clock(next(model.parameters()).device)
    marks: list = []
    handle = (
        unwrap_peft(model)
        .get_output_embeddings()
        .register_forward_hook(lambda *_: marks.append(clock.mark()) if not marks else None)
    )
    result = FirstToken()
    start = clock.mark()
    try:
        yield result
    finally:
        handle.remove()
    clock.sync()
    result.ms = clock.ms(start, marks[0]) if marks else None


def _timed(method, marks: Marks):
    @functools.wraps(method)  # generate() reads the feature methods' signatures: keep the original one visible
    def timed(*args, **kwargs):
        marks.open("vision")
        try:
            return method(*args, **kwargs)
        finally:
            marks.close("vision")

    return timed


@contextlib.contextmanager
def instrumented(model: nn.Module, clock: Clock) -> Iterator[Marks]:
    """Hooks on ``model``'s stages for the duration of the block, marking into the yielded :class:`Marks`; every
    hook and wrapper is removed on exit, also on error."""
    marks = Marks(clock)
    handles = []

    def span(module: nn.Module, stage: str) -> None:
        handles.append(module.register_forward_pre_hook(lambda *_: marks.open(stage)))
        handles.append(module.register_forward_hook(lambda *_: marks.close(stage)))

    family = family_of(model)
    for name, tower in vision_towers(model).items():
        # The tower's own forward is bypassed by VisionZip's early stop, so its span runs from its first module to
        # whichever of its layers finishes last.
        first, layers = family.tower_stages(name, tower)
        handles.append(first.register_forward_pre_hook(lambda *_: marks.open("tower")))
        for layer in layers:
            handles.append(layer.register_forward_hook(lambda *_: marks.close("tower")))
    for module in projector_modules(model).values():
        span(module, "projector")
    span(language_model(model), "llm")
    handles.append(
        unwrap_peft(model).get_output_embeddings().register_forward_hook(lambda *_: marks.head.append(clock.mark()))
    )
    inner = unwrap_peft(model).model
    names = [name for name in FEATURE_METHODS if hasattr(inner, name)]
    # VisionZip on Qwen encodes the media when generate() computes the positions, and the features calls then reuse
    # what it kept: where such an override is installed, its call belongs to the vision stage.
    names += [name for name in family.encoding_methods if name in inner.__dict__]
    overridden = {name: inner.__dict__.get(name) for name in names}
    for name in overridden:
        inner.__dict__[name] = _timed(getattr(inner, name), marks)
    try:
        yield marks
    finally:
        for handle in handles:
            handle.remove()
        for name, method in overridden.items():
            if method is None:  # the class's own method: drop the wrapper
                del inner.__dict__[name]
            else:  # VisionZip's instance override
                inner.__dict__[name] = method
