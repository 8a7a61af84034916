"""Conversation -> ``input_ids`` and ``labels``, tokenized segment by segment so labels can never drift from ids.

LLaVA-1.5 renders the whole prompt and then re-tokenizes substrings to find the answer spans; when the lengths
disagree it masks the entire sample and prints "tokenization mismatch". Here the prompt is cut into segments of
equal supervision (system + user turn + ``ASSISTANT:`` masked; `` answer</s>`` supervised) and each segment is
tokenized once: the ids are the concatenation of the segments' ids and the labels follow by construction.

Segment boundaries sit before the space that opens an answer. Llama-style tokenizers (sentencepiece with a dummy
prefix) encode ``"x"`` as ``"▁x"``: for them that space is dropped and the dummy prefix stands for it, which yields
exactly the ids of tokenizing the whole prompt; other tokenizers (byte-level BPE) keep the space.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from visionzip_tune.data.config import TEMPLATES
from visionzip_tune.data.validate import IMAGE_TAG, VIDEO_TAG, BadSample
from visionzip_tune.errors import UserError

IGNORE_INDEX = -100
# LLaVA-1.5's conv_vicuna_v1 system prompt (llava/conversation.py).
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class TooLong(BadSample):
    """The sample cannot fit ``max_length`` without cutting an image, a video or every answer: always dropped."""


@dataclass(frozen=True)
class Turn:
    role: str  # "human" | "gpt"
    images: int  # <image> tags of this turn, rendered at its start (after its <video> tags)
    text: str  # the turn without its tags, stripped
    videos: int = 0  # <video> tags of this turn, rendered first


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool


def llava_turns(conversations: Sequence[dict], n_images: int, n_videos: int = 0) -> list[Turn]:
    """LLaVA's view of a validated conversation (``preprocess_multimodal`` + ``preprocess_v1``).

    A leading gpt turn is dropped; so is a trailing human turn, which has no answer to learn. Each turn's
    ``<video>`` and ``<image>`` tags move to its start (``"<image>\\n" + text.strip()``). Images and videos with no
    tag at all get one at the start of the first human turn, so every image and video reaches the model.
    """
    start = 1 if conversations and conversations[0]["from"] == "gpt" else 0
    kept = list(conversations[start:])
    if kept and kept[-1]["from"] == "human":
        kept.pop()
    turns = [
        Turn(
            t["from"],
            t["value"].count(IMAGE_TAG),
            t["value"].replace(IMAGE_TAG, "").replace(VIDEO_TAG, "").strip(),
            t["value"].count(VIDEO_TAG),
        )
        for t in kept
    ]
    missing_images = max(0, n_images - sum(t.images for t in turns))
    missing_videos = max(0, n_videos - sum(t.videos for t in turns))
    if (missing_images or missing_videos) and turns:
        first = turns[0]
        turns[0] = Turn(first.role, first.images + missing_images, first.text, first.videos + missing_videos)
    return turns


def vicuna_v1_segments(
    turns: Sequence[Turn], bos: str, eos: str, image: str = IMAGE_TAG, video: str = VIDEO_TAG
) -> list[Segment]:
    """``<s>SYSTEM USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>`` (LLaVA ``v1``, sep style TWO).

    A turn's ``<video>\\n`` tags come before its ``<image>\\n`` tags (Video-LLaVA: ``USER: <video>\\nq ASSISTANT:``).
    """
    segments = [Segment(bos + VICUNA_V1_SYSTEM + " ", False)]
    for turn in turns:
        if turn.role == "human":
            tags = (video + "\n") * turn.videos + (image + "\n") * turn.images
            segments.append(Segment("USER: " + tags + turn.text + " ASSISTANT:", False))
        else:
            segments.append(Segment(" " + turn.text + eos, True))
    return segments


Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text


def chat_template_segments(turns: Sequence[Turn], render: Render) -> list[Segment]:
    """Segments of the tokenizer's chat template, found by rendering growing prefixes of the conversation.

    The text a message adds to the render is its segment; an assistant message's generation prompt is split off
    and masked. This needs no markers in the template, only that rendering a longer conversation extends the text.
    """
    messages = [
        {
            "role": "user" if t.role == "human" else "assistant",
            "content": [{"type": "video"}] * t.videos
            + [{"type": "image"}] * t.images
            + ([{"type": "text", "text": t.text}] if t.text else []),
        }
        for t in turns
    ]
    segments, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(messages[:k], True)
            segments.append(Segment(_extension(done, prompt), False))
            done = prompt
        full = render(messages[: k + 1], False)
        segments.append(Segment(_extension(done, full), message["role"] == "assistant"))
        done = full
    return segments


def _extension(prefix: str, text: str) -> str:
    if not text.startswith(prefix):
        raise UserError(
            "template chat_template: the chat template does not render conversations incrementally (rendering one "
            f"more message changed earlier text: {prefix[-60:]!r} is not a prefix of {text[: len(prefix) + 20]!r}); "
            "answer spans cannot be found. Use template vicuna_v1 or a template whose rendering only appends."
        )
    return text[len(prefix) :]


def _merge(segments: Sequence[Segment]) -> list[Segment]:
    """Join neighbours of equal supervision so each is tokenized as LLaVA tokenizes its prompt."""
    merged: list[Segment] = []
    for seg in segments:
        if merged and merged[-1].supervised == seg.supervised:
            merged[-1] = Segment(merged[-1].text + seg.text, seg.supervised)
        elif seg.text:
            merged.append(seg)
    return merged


class Templater:
    """Turns a validated conversation into ``(input_ids, labels)``: the k-th image becomes ``image_counts[k]`` ids of
    ``image_token_id`` and the k-th video ``video_counts[k]`` ids of ``video_token_id`` (None: no video input). A
    count may also be a layout: runs of placeholder ids (ints) between texts (strs), all unsupervised (Qwen3-VL
    writes a timestamp before each frame's run)."""

    def __init__(
        self,
        tokenizer,
        template: str,
        image_token_id: int,
        chat_template: str | None = None,
        video_token_id: int | None = None,
    ):
        if template not in TEMPLATES:
            raise UserError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
        if template == "chat_template" and not (chat_template or tokenizer.chat_template):
            raise UserError(
                "template chat_template: the tokenizer has no chat template (and none was given); "
                "use template vicuna_v1 or a model whose tokenizer/processor defines one"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.chat_template = chat_template
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        self.video_token = tokenizer.convert_ids_to_tokens(video_token_id) if video_token_id is not None else None
        placeholders = [t for t in (self.image_token, self.video_token) if t is not None]
        self._placeholder = re.compile("(" + "|".join(map(re.escape, placeholders)) + ")")
        encode = self._encode_text
        self.dummy_prefix = encode("a a") == encode("a") * 2

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def segments(self, turns: Sequence[Turn]) -> list[Segment]:
        if any(t.videos for t in turns) and self.video_token is None:
            raise UserError("the sample has a video but the templater was given no video token id")
        if self.template == "vicuna_v1":
            tok = self.tokenizer
            bos, eos = tok.bos_token or "", tok.eos_token or ""
            return _merge(vicuna_v1_segments(turns, bos, eos, self.image_token, self.video_token or VIDEO_TAG))
        return _merge(chat_template_segments(turns, self._render))

    def __call__(
        self,
        turns: Sequence[Turn],
        image_counts: Sequence[int | Sequence[str | int]],
        video_counts: Sequence[int | Sequence[str | int]] = (),
    ) -> tuple[list[int], list[int]]:
        if video_counts and self.video_token is None:
            raise UserError("the sample has a video but the templater was given no video token id")
        # placeholder token -> (its id, the token count of each of its runs in order, "images" | "videos")
        runs = {self.image_token: (self.image_token_id, list(image_counts), "images")}
        if self.video_token is not None:
            runs[self.video_token] = (self.video_token_id, list(video_counts), "videos")
        done = dict.fromkeys(runs, 0)
        ids: list[int] = []
        labels: list[int] = []
        for n, seg in enumerate(self.segments(turns)):
            text = seg.text[1:] if n and self.dummy_prefix and seg.text.startswith(" ") else seg.text
            for part in self._placeholder.split(text):
                if part in runs:
                    token_id, counts, kind = runs[part]
                    if done[part] == len(counts):
                        raise UserError(f"the {self.template} template rendered more {kind} than the sample has")
                    run = self._expand(token_id, counts[done[part]])
                    ids += run
                    labels += [IGNORE_INDEX] * len(run)
                    done[part] += 1
                elif part:
                    piece = self._encode_text(part)
                    ids += piece
                    labels += piece if seg.supervised else [IGNORE_INDEX] * len(piece)
        for token, (_, counts, kind) in runs.items():
            if done[token] != len(counts):
                raise UserError(
                    f"the {self.template} template rendered {done[token]} of the sample's {len(counts)} {kind}"
                )
        return ids, labels

    def _expand(self, token_id: int, layout: int | Sequence[str | int]) -> list[int]:
        """The ids of one image's (video's) placeholders: ``layout`` ids of ``token_id``, or a layout's runs of
        them between its texts."""
        if isinstance(layout, int):
            return [token_id] * layout
        return [
            i for piece in layout for i in ([token_id] * piece if isinstance(piece, int) else self._encode_text(piece))
        ]


def fit_to_length(
    ids: list[int], labels: list[int], image_token_id: int, max_length: int, video_token_id: int | None = None
) -> tuple[list[int], list[int]]:
    """Cut a sequence to ``max_length`` in its text only; ``TooLong`` if an image or video run, or every answer,
    would be lost."""
    if len(ids) <= max_length:
        return ids, labels
    placeholders = {image_token_id, video_token_id} - {None}
    media_end = max((k + 1 for k, t in enumerate(ids) if t in placeholders), default=0)
    if media_end > max_length:
        what = "images end" if ids[media_end - 1] == image_token_id else "video ends"
        raise TooLong(f"too long: its {what} at token {media_end}, past max_length {max_length}")
    labels = labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise TooLong(f"too long: no answer token within max_length {max_length} ({len(ids)} tokens)")
    return ids[:max_length], labels
