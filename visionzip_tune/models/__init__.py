"""Model code this package ships: transformers has no Mini-Gemini, so :mod:`.mini_gemini` is a native one, with its
converter; :mod:`.weight_files` reads checkpoint weights lazily (names and shapes first)."""
