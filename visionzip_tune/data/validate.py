"""What makes a LLaVA sample usable: one set of rules shared by ``data check``, loading and training.

Structure (cheap, no file access) is checked once when the JSON is loaded; images are checked when they are opened
(``images.open_image``). Every rule produces a short reason that names the offending turn, so the user can fix it.
"""

from __future__ import annotations

IMAGE_TAG = "<image>"
ROLES = ("human", "gpt")


class BadSample(Exception):
    """A sample that cannot be trained on; ``reason`` says why (shown next to the sample id)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def normalize_record(value: object, index: int) -> dict:
    """Map one JSON record to the loaded row: ``{"id", "images", "conversations", "problem"}``.

    ``id`` becomes a string (the LLaVA mix mixes int and str ids), ``image`` (a path or a list of paths, absent for
    text-only samples) becomes the list ``images``, and malformed pieces are coerced into the schema so that one bad
    sample never stops loading: ``problem`` then holds the reason (None for a well-formed sample).
    """
    if not isinstance(value, dict):
        return {"id": f"#{index}", "images": [], "conversations": [], "problem": "not a JSON object"}
    sample_id = f"#{index}" if value.get("id") is None else str(value["id"])
    images, problem = _images(value.get("image"))
    conversations, conv_problem = _conversations(value.get("conversations"))
    problem = problem or conv_problem or conversation_problem(conversations, len(images))
    return {"id": sample_id, "images": images, "conversations": conversations, "problem": problem}


def _images(image: object) -> tuple[list[str], str | None]:
    if image is None:
        return [], None
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return [], "'image' must be a path or a list of paths"
    if not all(p.strip() for p in paths):
        return [], "empty image path"
    return paths, None


def _conversations(turns: object) -> tuple[list[dict], str | None]:
    if not isinstance(turns, list) or not turns:
        return [], "no conversations"
    out, problem = [], None
    for k, turn in enumerate(turns):
        role = turn.get("from") if isinstance(turn, dict) else None
        text = turn.get("value") if isinstance(turn, dict) else None
        if problem is None and role not in ROLES:
            problem = f"conversations[{k}]: role {role!r} is not 'human' or 'gpt'"
        if problem is None and not isinstance(text, str):
            problem = f"conversations[{k}]: 'value' is not a string"
        out.append({"from": role if isinstance(role, str) else "", "value": text if isinstance(text, str) else ""})
    return out, problem


def conversation_problem(conversations: list[dict], n_images: int) -> str | None:
    """The first reason the conversation cannot be templated like LLaVA's ``preprocess_v1``, or None.

    LLaVA drops a leading gpt turn, then requires human/gpt alternation; an empty turn or an ``<image>`` tag
    without an image would make a silently broken example, so both are refused here.
    """
    start = 1 if conversations and conversations[0]["from"] == "gpt" else 0
    turns = conversations[start:]
    if not turns:
        return "no conversations"
    tags = 0
    for k, turn in enumerate(turns, start):
        expected = ROLES[(k - start) % 2]
        if turn["from"] != expected:
            return f"conversations[{k}]: roles do not alternate human/gpt (expected {expected!r}, got {turn['from']!r})"
        n_tags = turn["value"].count(IMAGE_TAG)
        if n_tags and turn["from"] == "gpt":
            return f"conversations[{k}]: {IMAGE_TAG} tag in a gpt turn"
        if not turn["value"].replace(IMAGE_TAG, "").strip() and not n_tags:
            return f"conversations[{k}]: empty {turn['from']} turn"
        tags += n_tags
    if len(turns) < 2:
        return "no gpt answer"
    if tags > n_images:
        return f"{tags} {IMAGE_TAG} tags but {n_images} image(s)"
    return None
