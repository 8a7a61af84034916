"""A synthetic LLaVA-format dataset a tiny model can learn on CPU: coloured shapes on coloured backgrounds.

Every answer is one word from a small closed set and depends only on the image, so held-out accuracy measures
whether the projector carries visual information into the LLM. The signal is made easy on purpose, because a
projector alone has little room to steer a frozen random LLM:

* large flat shapes, saturated colours; answers dealt in shuffled rounds (balanced: no majority answer to fall
  back on);
* the easiest question, background colour (it covers most patches, so it survives any token selection), is 60%
  of the questions: with the tiny demo model and 150 projector steps, a mix with 40% background questions
  learnt nothing, one with 60% gained ~20 points of held-out accuracy;
* each question type has its own answer set (shapes are white, gray or cyan; backgrounds saturated colours): a
  frozen random LLM hardly conditions on the question text, so the projector can only learn answers that do not
  contradict each other across question types;
* within an answer set all answers have the same number of tokens (tiny tokenizer), so summed log-probability
  scoring carries no length bias.

Optional video samples (``videos``): one shape moving towards the left, right, top or bottom edge over
``VIDEO_FRAMES`` frames on a flat background, asked "Which way does the shape move?". The answers are edges
(``top``/``bottom``, not ``up``/``down``) because only those have the two tokens ``left`` and ``right`` have.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw

from visionzip_tune.files import atomic_dir
from visionzip_tune.errors import UserError

IMAGE_SIZE = 224
# Within each answer set every answer has the same number of tokens under the tiny tokenizer (tiny.py).
COLOURS = {  # backgrounds
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "orange": (250, 130, 10),
    "pink": (250, 110, 190),
}
SHAPE_COLOURS = {"white": (245, 245, 245), "gray": (110, 110, 110), "cyan": (0, 235, 235)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("1", "2", "3")
SIDES = ("left", "right")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}  # edge -> unit step (x, y)
VIDEO_FRAMES = 8
MOTION_QUESTION = "Which way does the shape move?"


@dataclass(frozen=True)
class Scene:
    background: str
    colour: str  # all shapes of a scene share one colour and kind
    shape: str
    count: int
    side: str  # every shape lies in this half


@dataclass(frozen=True)
class Question:
    text: str
    choices: tuple[str, ...]
    answer: Callable[[Scene], str]
    weight: float  # how often it is asked


QUESTIONS = {
    "background": Question("What colour is the background?", tuple(COLOURS), lambda s: s.background, 0.6),
    "colour": Question("What color is the shape?", tuple(SHAPE_COLOURS), lambda s: s.colour, 0.15),
    "shape": Question("What shape is in the image?", SHAPES, lambda s: s.shape, 0.15),
    "count": Question("How many shapes are there?", COUNTS, lambda s: COUNTS[s.count - 1], 0.05),
    "side": Question("Which side is the shape on?", SIDES, lambda s: s.side, 0.05),
}
TEXT_ONLY = [
    ("What is the capital of France?", "Paris"),
    ("How many sides does a triangle have?", "three"),
    ("What colour is the sea?", "blue"),
    ("Is a square a shape?", "yes"),
]
TEXT_ONLY_FRACTION = 0.05
MULTI_TURN_FRACTION = 0.3
TAG_AFTER_FRACTION = 0.2  # "question\n<image>": LLaVA moves the tag to the front; the data should exercise that


class DemoPaths(NamedTuple):
    train: Path
    eval: Path
    images: Path  # the image folder: image paths in the JSON are relative to it


def random_scene(rng: random.Random, kind: str | None = None, answer: str | None = None) -> Scene:
    """A random scene; with ``kind``/``answer`` the scene is drawn so that question ``kind`` has that answer."""
    background = answer if kind == "background" else rng.choice(list(COLOURS))
    colour = answer if kind == "colour" else rng.choice(list(SHAPE_COLOURS))
    shape = answer if kind == "shape" else rng.choice(SHAPES)
    count = COUNTS.index(answer) + 1 if kind == "count" else rng.randint(1, 3)
    side = answer if kind == "side" else rng.choice(SIDES)
    return Scene(background, colour, shape, count, side)


class BalancedAnswers:
    """Answers of each question kind dealt in shuffled rounds, so every answer is equally frequent."""

    def __init__(self, rng: random.Random, choices: dict[str, tuple[str, ...]] | None = None):
        self.rng = rng
        self.choices = choices or {kind: question.choices for kind, question in QUESTIONS.items()}
        self.rounds: dict[str, list[str]] = {}

    def next(self, kind: str) -> str:
        if not self.rounds.get(kind):
            self.rounds[kind] = list(self.choices[kind])
            self.rng.shuffle(self.rounds[kind])
        return self.rounds[kind].pop()


def draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """The shapes are stacked in one half, each in its own cell, jittered inside it."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    half = IMAGE_SIZE // 2
    cell = IMAGE_SIZE // scene.count
    size = min(84, cell - 12)
    x0 = 0 if scene.side == "left" else half
    for k in range(scene.count):
        x = x0 + rng.randint(4, half - size - 4)
        y = k * cell + rng.randint(4, cell - size - 4)
        _draw_shape(draw, scene.shape, (x, y, x + size, y + size), SHAPE_COLOURS[scene.colour])
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, ...]) -> None:
    x, y, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x + right) // 2, y), (x, bottom), (right, bottom)], fill=fill)


def draw_motion(direction: str, rng: random.Random) -> list[Image.Image]:
    """``VIDEO_FRAMES`` frames of one shape crossing the frame towards the ``direction`` edge."""
    background, colour = rng.choice(list(COLOURS)), rng.choice(list(SHAPE_COLOURS))
    shape, size = rng.choice(SHAPES), 56
    dx, dy = DIRECTIONS[direction]
    travel = IMAGE_SIZE - size - 16  # from one margin to the other
    # Along the motion the shape starts 8 px from the edge it leaves; across it, a random position.
    start = [rng.randint(8, IMAGE_SIZE - size - 8) for _ in range(2)]
    for axis, step in enumerate((dx, dy)):
        if step:
            start[axis] = 8 if step > 0 else IMAGE_SIZE - size - 8
    frames = []
    for t in range(VIDEO_FRAMES):
        progress = round(travel * t / (VIDEO_FRAMES - 1))
        x, y = start[0] + dx * progress, start[1] + dy * progress
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOURS[background])
        _draw_shape(ImageDraw.Draw(img), shape, (x, y, x + size, y + size), SHAPE_COLOURS[colour])
        frames.append(img)
    return frames


def _video_sample(sample_id: str, frames_dir: str, direction: str) -> dict:
    return {
        "id": sample_id,
        "video": [f"{frames_dir}/{t:03d}.png" for t in range(VIDEO_FRAMES)],
        "conversations": [
            {"from": "human", "value": f"<video>\n{MOTION_QUESTION}"},
            {"from": "gpt", "value": direction},
        ],
    }


def _write_video_samples(
    images_dir: Path, split: str, first: int, count: int, rng: random.Random, with_choices: bool
) -> list[dict]:
    """``count`` motion samples (balanced directions), frames under ``images_dir/videos/<id>/NNN.png``."""
    answers = BalancedAnswers(rng, {"direction": tuple(DIRECTIONS)})
    samples = []
    for i in range(first, first + count):
        sample_id, direction = f"{split}-{i:06d}", answers.next("direction")
        frames_dir = f"videos/{sample_id}"
        (images_dir / frames_dir).mkdir(parents=True)
        for t, frame in enumerate(draw_motion(direction, rng)):
            frame.save(images_dir / frames_dir / f"{t:03d}.png")
        sample = _video_sample(sample_id, frames_dir, direction)
        samples.append({**sample, "choices": list(DIRECTIONS)} if with_choices else sample)
    return samples


def _ask(rng: random.Random, exclude: tuple[str, ...] = ()) -> str:
    kinds = [k for k in QUESTIONS if k not in exclude]
    return rng.choices(kinds, weights=[QUESTIONS[k].weight for k in kinds])[0]


def _human(question: str, with_image: bool, rng: random.Random) -> str:
    if not with_image:
        return question
    return f"{question}\n<image>" if rng.random() < TAG_AFTER_FRACTION else f"<image>\n{question}"


def _image_sample(sample_id: str, image: str, scene: Scene, kinds: list[str], rng: random.Random) -> dict:
    turns = []
    for k, kind in enumerate(kinds):
        turns.append({"from": "human", "value": _human(QUESTIONS[kind].text, k == 0, rng)})
        turns.append({"from": "gpt", "value": QUESTIONS[kind].answer(scene)})
    return {"id": sample_id, "image": image, "conversations": turns}


def _write_json(path: Path, samples: list[dict]) -> None:
    path.write_text("[\n" + ",\n".join(json.dumps(s) for s in samples) + "\n]\n", encoding="utf-8")


def make_demo_dataset(
    out_dir: str | Path, n: int = 1000, seed: int = 0, n_eval: int | None = None, videos: int = 0
) -> DemoPaths:
    """Write ``out_dir/train.json`` (``n`` samples), ``out_dir/eval.json`` (``n_eval``, default ``max(8, n // 4)``)
    and ``out_dir/images/*.png`` (224 px); deterministic per seed. Image paths are relative to ``out_dir/images``.

    Train: single- and two-turn questions, ~5% text-only. Eval: single-turn image questions with ``"choices"``
    (the question's closed answer set); the gold answer is the last gpt turn. ``videos`` of the ``n`` training
    samples (and the same share of the held-out ones, at least one) are motion videos given as frame lists,
    ``images/videos/<id>/NNN.png``: the image folder is their video folder too. With ``videos=0`` no random draw
    serves videos, so an image-only dataset is the same bytes for a seed whatever video support is added later.
    """
    out_dir = Path(out_dir)
    if n < 1:
        raise ValueError(f"make_demo_dataset: n must be at least 1, not {n}")
    if not 0 <= videos <= n:
        raise ValueError(f"make_demo_dataset: videos must be between 0 and n ({n}), not {videos}")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "train.json").exists():
        raise UserError(f"{out_dir} exists and is not a demo dataset; choose an empty or new directory")
    n_eval = max(8, n // 4) if n_eval is None else n_eval
    eval_videos = min(n_eval, max(1, n_eval * videos // n)) if videos else 0
    rng = random.Random(seed)
    answers = BalancedAnswers(rng)
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        train, evaluation = [], []
        for i in range(n - videos):
            if rng.random() < TEXT_ONLY_FRACTION:
                question, answer = rng.choice(TEXT_ONLY)
                turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
                train.append({"id": f"train-{i:06d}", "conversations": turns})
                continue
            kinds = [_ask(rng)]
            scene = random_scene(rng, kinds[0], answers.next(kinds[0]))
            if rng.random() < MULTI_TURN_FRACTION:
                kinds.append(_ask(rng, exclude=tuple(kinds)))
            image = f"train_{i:06d}.png"
            draw_scene(scene, rng).save(tmp / "images" / image)
            train.append(_image_sample(f"train-{i:06d}", image, scene, kinds, rng))
        train += _write_video_samples(tmp / "images", "train", n - videos, videos, rng, with_choices=False)
        answers = BalancedAnswers(rng)  # fresh rounds: the held-out answers are balanced on their own
        for i in range(n_eval - eval_videos):
            kind = _ask(rng)
            scene = random_scene(rng, kind, answers.next(kind))
            image = f"eval_{i:06d}.png"
            draw_scene(scene, rng).save(tmp / "images" / image)
            sample = _image_sample(f"eval-{i:06d}", image, scene, [kind], rng)
            evaluation.append({**sample, "choices": list(QUESTIONS[kind].choices)})
        evaluation += _write_video_samples(
            tmp / "images", "eval", n_eval - eval_videos, eval_videos, rng, with_choices=True
        )
        _write_json(tmp / "train.json", train)
        _write_json(tmp / "eval.json", evaluation)
    return DemoPaths(out_dir / "train.json", out_dir / "eval.json", out_dir / "images")
