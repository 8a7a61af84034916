"""`python -m visionzip_tune generate`: prompts templated as in training, the exported budget, multi-turn chat."""

from __future__ import annotations

import io
import json

import pytest
from conftest import cli_error, greedy_answer
from PIL import Image

from visionzip_tune.__main__ import main as cli
from visionzip_tune.training import build
from visionzip_tune.data import DataConfig, SupervisedDataset, load_samples
from visionzip_tune.data.processing import Processing
from visionzip_tune.inference.chat import Chat
from visionzip_tune.inference.prompts import Prompter
from visionzip_tune.inference.load import load_model
from visionzip_tune.demo.tiny import TinySpec, save_tiny

MAX_NEW = 6


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (300, 200), (220, 30, 30)).save(path)  # not square: the pad transform matters
    return path


def reference_answer(model, processor, picture, questions: list[str], answers: list[str]) -> tuple[str, list[int]]:
    """Greedy answer to the last question, with the prompt built by the TRAINING dataset: the sample of the
    conversation (dummy last answer) cut where its last answer's supervised labels begin."""
    turns = []
    for k, (question, answer) in enumerate(zip(questions, [*answers, "x"])):
        turns += [
            {"from": "human", "value": ("<image>\n" if k == 0 else "") + question},
            {"from": "gpt", "value": answer},
        ]
    path = picture.parent / "sample.json"
    path.write_text(json.dumps([{"id": "q", "image": picture.name, "conversations": turns}]))
    # The export records no recipe: prompts follow the model's own chat template (Prompter.for_recipe's rule).
    tokenizer = processor.tokenizer
    dataset = SupervisedDataset(
        load_samples(path),
        DataConfig(image_folder=picture.parent, template="chat_template"),
        Processing(tokenizer, processor.image_processor, tokenizer.chat_template),
        build.placeholders(model.config),
    )
    return greedy_answer(model, processor.tokenizer, dataset[0], MAX_NEW)


def test_generate_answers_with_the_exported_projector_and_budget(tiny_clip_export, picture, capsys):
    trained, processor, _, export = tiny_clip_export
    argv = [
        "generate",
        "--projector",
        str(export),
        "--image",
        str(picture),
        "--prompt",
        "What colour is it?",
        "--max-new-tokens",
        str(MAX_NEW),
        "--show-prompt",
    ]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    expected, prompt = reference_answer(trained, processor, picture, ["What colour is it?"], [])
    assert prompt.count(trained.config.image_token_index) == 64  # D + C placeholders, not the stock 256
    assert expected and captured.out.strip() == expected
    assert "USER: <image>x64\nWhat colour is it? ASSISTANT:" in captured.err
    assert "(VisionZip 54 + 10: 64 tokens per image)" in captured.err


def test_interactive_mode_keeps_the_conversation(tiny_clip_export, picture, capsys, monkeypatch):
    trained, processor, _, export = tiny_clip_export
    monkeypatch.setattr("sys.stdin", io.StringIO("What colour is it?\nIs there a circle?\n\nnever read\n"))
    argv = [
        "generate",
        "--projector",
        str(export),
        "--image",
        str(picture),
        "--interactive",
        "--max-new-tokens",
        str(MAX_NEW),
        "--show-prompt",
    ]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    answers = captured.out.strip().splitlines()
    first, _ = reference_answer(trained, processor, picture, ["What colour is it?"], [])
    questions = ["What colour is it?", "Is there a circle?"]
    second, prompt = reference_answer(trained, processor, picture, questions, [first])
    assert answers == [first, second]
    # The second prompt carries the first exchange, as in a two-turn training sample (after </s> the Llama-style
    # tokenizer starts "USER" with its word-start marker, shown as a space).
    assert prompt.count(trained.config.image_token_index) == 64
    assert f"What colour is it? ASSISTANT: {first}</s> USER: Is there a circle? ASSISTANT:" in captured.err


def test_image_command_starts_a_new_conversation(tiny_clip_export, picture, tmp_path):
    _, _, _, export = tiny_clip_export
    model, processing, _ = load_model(None, str(export))
    chat = Chat(model, Prompter.for_recipe(model, processing, None), image=picture, max_new_tokens=MAX_NEW)
    chat.ask("What colour is it?")
    chat.ask("Is there a circle?")
    assert chat.show_prompt().count("USER:") == 2
    other = tmp_path / "blue.png"
    Image.new("RGB", (224, 224), (20, 20, 230)).save(other)
    chat.set_image(other)
    chat.ask("What colour is it?")
    assert chat.show_prompt().count("USER:") == 1 and chat.history == [("What colour is it?", chat.history[0][1])]


def test_stock_and_training_free_budgets(tiny_clip_dir, picture, capsys):
    base = [
        "generate",
        "--model",
        str(tiny_clip_dir),
        "--image",
        str(picture),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
        "--show-prompt",
    ]
    assert cli(base) == 0
    assert "<image>x256" in capsys.readouterr().err  # stock LLaVA: every patch, CLS dropped
    assert cli([*base, "--dominant", "108", "--contextual", "20"]) == 0
    assert "<image>x128" in capsys.readouterr().err


def test_chat_template_option(tiny_clip_export, picture, capsys):
    _, _, _, export = tiny_clip_export
    argv = [
        "generate",
        "--projector",
        str(export),
        "--image",
        str(picture),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
        "--show-prompt",
        "--template",
        "chat_template",
    ]
    assert cli(argv) == 0
    err = capsys.readouterr().err
    assert "USER: <image>x64\nHi ASSISTANT:" in err and "A chat between" not in err  # no vicuna system prompt


def test_generate_errors(tiny_clip_export, tiny_clip_dir, picture, tmp_path, capsys):
    _, _, _, export = tiny_clip_export
    common = ["--image", str(picture), "--prompt", "Hi", "--max-new-tokens", "2"]
    assert "Give one or the other" in cli_error(
        ["generate", "--projector", str(export), "--dominant", "54", "--contextual", "10", *common], capsys
    )
    assert "give both dominant and contextual" in cli_error(
        ["generate", "--model", str(tiny_clip_dir), "--dominant", "54", *common], capsys
    )
    assert "dominant + contextual" in cli_error(
        ["generate", "--model", str(tiny_clip_dir), "--dominant", "250", "--contextual", "30", *common], capsys
    )
    assert "missing image" in cli_error(
        ["generate", "--projector", str(export), "--image", str(tmp_path / "none.png"), "--prompt", "Hi"], capsys
    )
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert f"unreadable image {broken}" in cli_error(
        ["generate", "--projector", str(export), "--image", str(broken), "--prompt", "Hi"], capsys
    )
    assert "does not exist" in cli_error(["generate", "--projector", str(tmp_path / "nothing"), *common], capsys)
    # A flag that would do nothing stops the command before anything loads.
    model = ["generate", "--model", str(tiny_clip_dir), *common]
    assert "--video-frames 4: it sets the frames taken from --video" in cli_error(
        [*model, "--video-frames", "4"], capsys
    )
    assert "--other-compressor: it applies --budget's compressor under --projector" in cli_error(
        [*model, "--budget", "pool:16", "--other-compressor"], capsys
    )
    assert "--no-check-fingerprint: it concerns a projector's base weights" in cli_error(
        [*model, "--no-check-fingerprint"], capsys
    )
    assert "cannot load the model" in cli_error(["generate", "--model", str(tmp_path / "nothing"), *common], capsys)
    other = save_tiny(tmp_path / "other", TinySpec(seed=1))
    message = cli_error(["generate", "--projector", str(export), "--model", str(other), *common], capsys)
    assert "fingerprint" in message and str(export) in message
    assert cli(["generate", "--projector", str(export), "--model", str(other), "--no-check-fingerprint", *common]) == 0
