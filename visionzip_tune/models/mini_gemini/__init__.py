"""Mini-Gemini (MGM, dvlab-research/MGM) as a native transformers-5 model, laid out as transformers lays out its
models: configuration, modeling, image processing and the converter of original checkpoints. Importing this
package registers the model with transformers' Auto classes (:func:`register`), so ``from_pretrained`` works
without remote code."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from visionzip_tune.models.mini_gemini.configuration_mini_gemini import MiniGeminiConfig
from visionzip_tune.models.mini_gemini.image_processing_mini_gemini import build_image_processor
from visionzip_tune.models.mini_gemini.modeling_mini_gemini import (
    MiniGeminiForConditionalGeneration,
    MiniGeminiModel,
)


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageTextToText`` know ``model_type="mini_gemini"``, so
    ``from_pretrained`` works without remote code. Idempotent; runs at import of this module."""
    AutoConfig.register(MiniGeminiConfig.model_type, MiniGeminiConfig, exist_ok=True)
    AutoModel.register(MiniGeminiConfig, MiniGeminiModel, exist_ok=True)
    AutoModelForImageTextToText.register(MiniGeminiConfig, MiniGeminiForConditionalGeneration, exist_ok=True)


register()

__all__ = ["MiniGeminiConfig", "MiniGeminiForConditionalGeneration", "MiniGeminiModel", "build_image_processor"]
