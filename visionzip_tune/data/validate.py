"""What makes a LLaVA sample usable: one set of rules shared by ``data check``, loading and training.

Structure (cheap, no file access) is checked once when the JSON is loaded; images and videos are checked when they
are opened (``images.open_image``, ``video.read_video``). Every rule produces a short reason that names the
offending turn, so the user can fix it.
"""

from __future__ import annotations

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
ROLES = ("human", "gpt")


class BadSample(Exception):
    """A sample that cannot be trained on; ``reason`` says why (shown next to the sample id)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def normalize_record(value: object, index: int) -> dict:
    """Map one JSON record to the loaded row: ``{"id", "images", "video_file", "frame_files", "conversations",
    "problem"}``.

    ``id`` becomes a string (the LLaVA mix mixes int and str ids), ``image`` (a path or a list of paths, absent for
    text-only samples) becomes the list ``images``, ``video`` (a video file's path, or the list of a video's frame
    files in time order) becomes ``video_file`` (None unless a file) and ``frame_files`` (empty unless frames), and
    malformed pieces are coerced into the schema so that one bad sample never stops loading: ``problem`` then holds
    the reason (None for a well-formed sample).
    """
    if not isinstance(value, dict):
        empty = {"images": [], "video_file": None, "frame_files": [], "conversations": []}
        return {"id": f"#{index}", **empty, "problem": "not a JSON object"}
    sample_id = f"#{index}" if value.get("id") is None else str(value["id"])
    images, problem = _images(value.get("image"))
    video, video_problem = _video(value.get("video"))
    conversations, conv_problem = _conversations(value.get("conversations"))
    n_videos = 0 if video is None else 1
    problem = problem or video_problem or conv_problem or conversation_problem(conversations, len(images), n_videos)
    return {
        "id": sample_id,
        "images": images,
        "video_file": video if isinstance(video, str) else None,
        "frame_files": video if isinstance(video, list) else [],
        "conversations": conversations,
        "problem": problem,
    }


def row_video(row: dict) -> str | list[str] | None:
    """The video of a loaded row as the sample gave it: a file's path, a list of frame paths, or None."""
    return row["video_file"] if row["video_file"] is not None else (row["frame_files"] or None)


def _images(image: object) -> tuple[list[str], str | None]:
    if image is None:
        return [], None
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return [], "'image' must be a path or a list of paths"
    if not all(p.strip() for p in paths):
        return [], "empty image path"
    return paths, None


def _video(video: object) -> tuple[str | list[str] | None, str | None]:
    if video is None:
        return None, None
    if isinstance(video, list) and len(video) > 1 and all(isinstance(v, list) for v in video):
        return None, f"{len(video)} videos: at most one video per sample"
    if not isinstance(video, str) and not (isinstance(video, list) and all(isinstance(v, str) for v in video)):
        return None, "'video' must be a video file's path or a list of frame paths"
    if isinstance(video, list) and not video:
        return None, "'video' is an empty list of frames"
    if not all(v.strip() for v in ([video] if isinstance(video, str) else video)):
        return None, "empty video path"
    return video, None


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


def conversation_problem(conversations: list[dict], n_images: int, n_videos: int = 0) -> str | None:
    """The first reason the conversation cannot be templated like LLaVA's ``preprocess_v1``, or None.

    LLaVA drops a leading gpt turn, then requires human/gpt alternation; an empty turn, or an ``<image>`` /
    ``<video>`` tag without its image / video, would make a silently broken example, so they are refused here.
    """
    start = 1 if conversations and conversations[0]["from"] == "gpt" else 0
    turns = conversations[start:]
    if not turns:
        return "no conversations"
    tags = {IMAGE_TAG: 0, VIDEO_TAG: 0}
    for k, turn in enumerate(turns, start):
        expected = ROLES[(k - start) % 2]
        if turn["from"] != expected:
            return f"conversations[{k}]: roles do not alternate human/gpt (expected {expected!r}, got {turn['from']!r})"
        for tag in tags:
            n_tags = turn["value"].count(tag)
            if n_tags and turn["from"] == "gpt":
                return f"conversations[{k}]: {tag} tag in a gpt turn"
            tags[tag] += n_tags
        if not turn["value"].strip():
            return f"conversations[{k}]: empty {turn['from']} turn"
    if len(turns) < 2:
        return "no gpt answer"
    if tags[IMAGE_TAG] > n_images:
        return f"{tags[IMAGE_TAG]} {IMAGE_TAG} tags but {n_images} image(s)"
    if tags[VIDEO_TAG] > n_videos:
        return f"{tags[VIDEO_TAG]} {VIDEO_TAG} tags but {n_videos} video(s)"
    return None
