"""What the data path needs of a saved model besides its weights: its tokenizer, image processor and chat template."""

from __future__ import annotations

from typing import Any, NamedTuple

from transformers import AutoImageProcessor, AutoTokenizer


class Processing(NamedTuple):
    """What training, evaluation and generation need to turn a sample into model inputs."""

    tokenizer: Any
    image_processor: Any
    chat_template: str | None  # the tokenizer's chat template (None when it has none)


def load_processing(name_or_path: str) -> Processing:
    """The :class:`Processing` of a saved model, loaded without the multimodal processor class (Video-LLaVA's and
    OneVision's build a video processor that requires torchvision, which the data path never uses: frames go
    through the image processor).

    ``OSError`` as from ``from_pretrained`` when something is missing.
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    return Processing(tokenizer, image_processor, tokenizer.chat_template)
