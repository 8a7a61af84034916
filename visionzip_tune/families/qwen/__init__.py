"""The Qwen VL families: Qwen2.5-VL and Qwen3-VL, on one shared definition (``base.QwenFamily``)."""
