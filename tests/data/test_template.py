"""Templating and label masking: parity with LLaVA-1.5's preprocess_v1, chat templates, image runs, truncation."""

from __future__ import annotations

import functools
import itertools

import pytest

from visionzip_tune.data.template import (
    IGNORE_INDEX,
    VICUNA_V1_SYSTEM,
    Templater,
    TooLong,
    fit_to_length,
    llava_turns,
)
from visionzip_tune.errors import UserError

LLAVA_IMAGE_PLACEHOLDER = -200  # LLaVA's IMAGE_TOKEN_INDEX: one id per image, expanded inside the model


def conv(*values, first="human"):
    roles = ("human", "gpt") if first == "human" else ("gpt", "human")
    return [{"from": roles[k % 2], "value": v} for k, v in enumerate(values)]


def llava_preprocess_v1(conversations, tokenizer, legacy=True):
    """LLaVA-1.5 ``preprocess_multimodal`` + ``preprocess_v1`` as documented (research notes, training_anchors 1.1-1.3).

    Returns (input_ids with one -200 per image, labels, mismatch). Written independently of the library: the prompt
    is built as one string, tokenized with ``tokenizer_image_token`` and masked by re-tokenizing round substrings.
    """
    sources = []
    for turn in conversations:
        value = turn["value"]
        if "<image>" in value:
            value = "<image>\n" + value.replace("<image>", "").strip()
        sources.append((turn["from"], value))
    if sources[0][0] != "human":
        sources = sources[1:]
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    prompt = VICUNA_V1_SYSTEM + " "
    for j, (role, value) in enumerate(sources):
        assert role == ("human", "gpt")[j % 2]
        prompt += roles[role] + ": " + value + (" ", "</s>")[j % 2]

    def tokenizer_image_token(text):
        ids = [tokenizer.bos_token_id]
        for k, chunk in enumerate(text.split("<image>")):
            if k:
                ids.append(LLAVA_IMAGE_PLACEHOLDER)
            ids += tokenizer(chunk).input_ids[1:]  # each chunk is tokenized with its own BOS, which is dropped
        return ids

    input_ids = tokenizer_image_token(prompt)
    target = list(input_ids)
    total_len = len(target)
    sep = " ASSISTANT: "
    cur_len = 1
    target[:1] = [IGNORE_INDEX]
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou))
        instruction_len = len(tokenizer_image_token(parts[0])) - 2
        if i != 0 and not legacy:
            round_len -= 1
            instruction_len -= 1
        target[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    mismatch = cur_len != total_len
    if mismatch:
        target = [IGNORE_INDEX] * len(target)
    return input_ids, target, mismatch


def expand_images(ids, labels, count, image_token_id):
    out_ids, out_labels = [], []
    for t, y in zip(ids, labels):
        if t == LLAVA_IMAGE_PLACEHOLDER:
            out_ids += [image_token_id] * count
            out_labels += [IGNORE_INDEX] * count
        else:
            out_ids.append(t)
            out_labels.append(y)
    return out_ids, out_labels


@pytest.fixture(scope="module")
def image_id(tiny_tokenizer):
    return tiny_tokenizer.convert_tokens_to_ids("<image>")


PARITY_CASES = [
    (conv("<image>\nWhat colour is the background?", "red"), 1),
    (
        conv(
            "What colour is the background?\n<image>",
            "blue",
            "How many shapes are there?",
            "two",
            "Which side is the shape on?",
            "left",
        ),
        1,
    ),
    (conv("Describe the picture.", "Sure! Here is a short answer.", "Is there a circle?", "yes"), 0),
    (
        conv(
            "A preamble from the assistant.",
            "<image> Where is the shape?",
            "right",
            "Is there a square?",
            "no",
            first="gpt",
        ),
        1,
    ),
    (conv("<image>", "a red square on the left"), 1),
]


@pytest.mark.parametrize("conversation, n_images", PARITY_CASES)
def test_vicuna_v1_matches_llava_preprocess_v1(tiny_tokenizer, image_id, conversation, n_images):
    tok = tiny_tokenizer
    # The tiny tokenizer behaves like a legacy Llama tokenizer: text after </s> gets the dummy "▁" prefix, which is
    # the case where LLaVA's round arithmetic needs no "-1" correction.
    assert tok.convert_ids_to_tokens(tok.encode("</s>USER", add_special_tokens=False))[1].startswith("▁")
    ref_ids, ref_labels, mismatch = llava_preprocess_v1(conversation, tok, legacy=True)
    assert not mismatch, "the reference itself reports a tokenization mismatch: the test setup is wrong"
    ref_ids, ref_labels = expand_images(ref_ids, ref_labels, 64, image_id)

    ids, labels = Templater(tok, "vicuna_v1", image_id)(llava_turns(conversation, n_images), [64] * n_images)

    assert ids == ref_ids
    assert labels == ref_labels
    supervised = tok.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX])
    answers = [t["value"] for t in conversation[1 if conversation[0]["from"] == "gpt" else 0 :] if t["from"] == "gpt"]
    assert supervised.replace(" ", "") == "".join(a + "</s>" for a in answers).replace(" ", "")


def test_parity_check_would_catch_a_leading_space_error(tiny_tokenizer, image_id):
    """Tokenizing answers with their separating space (the classic sentencepiece slip) changes the ids."""
    conversation = conv("<image>\nWhat colour is the background?", "red", "How many shapes are there?", "two")
    ref_ids, _, _ = llava_preprocess_v1(conversation, tiny_tokenizer)
    templater = Templater(tiny_tokenizer, "vicuna_v1", image_id)
    templater.dummy_prefix = False  # as if the tokenizer did not add "▁" by itself
    ids, _ = templater(llava_turns(conversation, 1), [1])
    assert ids != expand_images(ref_ids, ref_ids, 1, image_id)[0]


def test_text_only_ids_equal_tokenizing_the_whole_prompt(tiny_tokenizer, image_id):
    turns = llava_turns(conv("Tell me a short story.", "I do not know.", "What is the capital of France?", "Paris."), 0)
    for template in ("vicuna_v1", "chat_template"):
        templater = Templater(tiny_tokenizer, template, image_id)
        whole = "".join(seg.text for seg in templater.segments(turns))
        ids, labels = templater(turns, [])
        assert ids == tiny_tokenizer.encode(whole, add_special_tokens=False)
        assert labels[0] == IGNORE_INDEX and ids[0] == tiny_tokenizer.bos_token_id


def test_chat_template_supervises_exactly_the_assistant_turns(tiny_tokenizer, image_id):
    tok = tiny_tokenizer
    turns = llava_turns(conv("<image>\nWhat colour is the background?", "red", "Is there a circle?", "yes"), 1)
    ids, labels = Templater(tok, "chat_template", image_id)(turns, [5])
    assert ids.count(image_id) == 5
    runs, current = [], []
    for t, y in zip(ids, labels):
        if y != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [tok.decode(r) for r in runs] == ["red</s>", "yes</s>"]
    rendered = tok.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What colour is the background?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            {"role": "user", "content": [{"type": "text", "text": "Is there a circle?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
        ],
        tokenize=False,
    )
    before, after = rendered.split("<image>")
    encode = functools.partial(tok.encode, add_special_tokens=False)
    assert ids == encode(before) + [image_id] * 5 + encode(after)


def test_chat_template_that_rewrites_earlier_text_is_refused(tiny_tokenizer, image_id):
    counting = "{% for m in messages %}{{ messages|length }}:{{ m['role'] }} {% endfor %}"
    templater = Templater(tiny_tokenizer, "chat_template", image_id, chat_template=counting)
    with pytest.raises(UserError, match="does not render conversations incrementally"):
        templater(llava_turns(conv("hi", "yo"), 0), [])


def test_chat_template_missing_and_unknown_template(image_id):
    from visionzip_tune.demo.tiny import build_tokenizer

    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(UserError, match="has no chat template"):
        Templater(bare, "chat_template", image_id)
    with pytest.raises(UserError, match="unknown template 'llama9'"):
        Templater(bare, "llama9", image_id)


def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE (no dummy prefix: "red" and " red" are different tokens), built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<image>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([VICUNA_V1_SYSTEM, "USER: ASSISTANT: red blue What colour is the background?"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_byte_level_tokenizer_keeps_the_answer_space():
    tok = byte_level_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    templater = Templater(tok, "vicuna_v1", image_id)
    assert not templater.dummy_prefix
    turns = llava_turns(conv("What colour is the background?", "red", "And now?", "blue"), 0)
    ids, labels = templater(turns, [])
    whole = "".join(seg.text for seg in templater.segments(turns))
    assert ids == tok.encode(whole, add_special_tokens=False)
    supervised = [t for t, y in zip(ids, labels) if y != IGNORE_INDEX]
    assert tok.decode(supervised) == " red</s> blue</s>"


def test_llava_turns_moves_tags_drops_leading_gpt_and_trailing_human():
    turns = llava_turns(conv("hello", "Where?\n<image> ", "right", "And?", first="gpt"), 1)
    assert [(t.role, t.images, t.text) for t in turns] == [("human", 1, "Where?"), ("gpt", 0, "right")]
    untagged = llava_turns(conv("What is this?", "a cat"), 2)
    assert untagged[0].images == 2 and untagged[0].text == "What is this?"


def test_each_image_gets_its_own_token_count(tiny_tokenizer, image_id):
    turns = llava_turns(conv("<image> and <image>: same?", "no"), 2)
    ids, labels = Templater(tiny_tokenizer, "vicuna_v1", image_id)(turns, [3, 7])
    runs = "".join("i" if t == image_id else "." for t in ids).split(".")
    assert [len(r) for r in runs if r] == [3, 7]
    assert all(y == IGNORE_INDEX for t, y in zip(ids, labels) if t == image_id)


def test_fit_to_length_cuts_text_only():
    img = 9
    ids = [1, 5, img, img, img, 6, 7, 8, 2]
    labels = [IGNORE_INDEX] * 6 + [7, 8, 2]
    assert fit_to_length(ids, labels, img, 20) == (ids, labels)
    cut_ids, cut_labels = fit_to_length(ids, labels, img, 7)
    assert cut_ids == ids[:7] and cut_labels == labels[:7]
    with pytest.raises(TooLong, match="no answer token within max_length 6"):
        fit_to_length(ids, labels, img, 6)
    with pytest.raises(TooLong, match="images end at token 5, past max_length 4"):
        fit_to_length(ids, labels, img, 4)


# ----------------------------------------------------------------------------------------------------------------
# <video>: Video-LLaVA / OneVision samples


@pytest.fixture(scope="module")
def video_tokenizer():
    from visionzip_tune.demo.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tok


def media_templater(tok, template="vicuna_v1", chat_template=None) -> Templater:
    ids = tok.convert_tokens_to_ids(["<image>", "<video>"])
    return Templater(tok, template, ids[0], chat_template, video_token_id=ids[1])


def runs_of(ids, templater):
    """[(kind, length)] of the placeholder runs in ``ids``, in order."""
    kinds = {templater.image_token_id: "image", templater.video_token_id: "video"}
    return [(kinds[t], len(list(run))) for t, run in itertools.groupby(ids) if t in kinds]


def test_video_tag_renders_before_images_and_expands_to_its_count(video_tokenizer):
    tok = video_tokenizer
    templater = media_templater(tok)
    turns = llava_turns(conv("Is <image> in the <video>?", "yes", "Sure?", "no"), 1, 1)
    assert [(t.images, t.videos, t.text) for t in turns] == [
        (1, 1, "Is  in the ?"),
        (0, 0, "yes"),
        (0, 0, "Sure?"),
        (0, 0, "no"),
    ]
    whole = "".join(seg.text for seg in templater.segments(turns))
    assert "USER: <video>\n<image>\nIs  in the ? ASSISTANT:" in whole  # Video-LLaVA: USER: <video>\n... ASSISTANT:
    ids, labels = templater(turns, [3], [7])
    assert runs_of(ids, templater) == [("video", 7), ("image", 3)]
    placeholders = {templater.image_token_id, templater.video_token_id}
    assert all(y == IGNORE_INDEX for t, y in zip(ids, labels) if t in placeholders)
    assert tok.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX]).replace(" ", "") == "yes</s>no</s>"
    # The text between the runs is what tokenizing the rendered prompt gives.
    before, rest = whole.split("<video>")
    encode = functools.partial(tok.encode, add_special_tokens=False)
    assert ids[: len(encode(before))] == encode(before)


def test_untagged_video_goes_to_the_first_human_turn(video_tokenizer):
    turns = llava_turns(conv("A preamble.", "What happens?", "a shape moves", first="gpt"), 0, 1)
    assert [(t.role, t.images, t.videos) for t in turns] == [("human", 0, 1), ("gpt", 0, 0)]
    ids, _ = media_templater(video_tokenizer)(turns, [], [5])
    assert runs_of(ids, media_templater(video_tokenizer)) == [("video", 5)]


def test_chat_template_renders_video_items(video_tokenizer):
    from visionzip_tune.demo.tiny import CHAT_TEMPLATE

    video_item = "{% elif item['type'] == 'video' %}{{ '<video>\n' }}"
    assert video_item in CHAT_TEMPLATE
    turns = llava_turns(conv("<video>\nWhich way?", "left"), 0, 1)
    templater = media_templater(video_tokenizer, "chat_template", CHAT_TEMPLATE)
    ids, labels = templater(turns, [], [4])
    assert runs_of(ids, templater) == [("video", 4)]
    assert video_tokenizer.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX]) == "left</s>"
    # A template that drops video items would silently lose the video: refused.
    without_video = CHAT_TEMPLATE.replace(video_item, "")
    with pytest.raises(UserError, match="rendered 0 of the sample's 1 videos"):
        media_templater(video_tokenizer, "chat_template", without_video)(turns, [], [4])


def test_video_without_a_video_token_is_refused(video_tokenizer):
    templater = Templater(video_tokenizer, "vicuna_v1", video_tokenizer.convert_tokens_to_ids("<image>"))
    with pytest.raises(UserError, match="has a video but the templater was given no video token id"):
        templater(llava_turns(conv("<video> What?", "x"), 0, 1), [], [4])


def test_fit_to_length_never_cuts_a_video_run():
    img, vid = 9, 8
    ids = [1, 5, vid, vid, vid, img, 6, 7, 2]
    labels = [IGNORE_INDEX] * 7 + [7, 2]
    assert fit_to_length(ids, labels, img, 8, vid) == (ids[:8], labels[:8])
    with pytest.raises(TooLong, match="images end at token 6, past max_length 5"):
        fit_to_length(ids, labels, img, 5, vid)
    video_last = [1, 5, img, vid, vid, 6, 7, 2]
    with pytest.raises(TooLong, match="video ends at token 5, past max_length 4"):
        fit_to_length(video_last, [IGNORE_INDEX] * 6 + [7, 2], img, 4, vid)
