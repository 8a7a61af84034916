"""Asking, timing and looking: the model an inference command runs (:mod:`.load`), prompts built as training
builds samples (:mod:`.prompts`), a chat (:mod:`.chat`), the settings commands compare (:mod:`.variants`), stage
timing (:mod:`.stage_timer`, :mod:`.timing`) and the picture of kept patches (:mod:`.picture`)."""
