"""One tower pass per medium across evaluation settings and requests (``evaluation/tower_share.py``), for every
family: the training-free and the "tuned" projector at one budget, and every request about one image (its
generation and each scored choice), run the tower once per image or video, and every answer is the one computed
without sharing; a change of budget, or of weights the rows come from (Mini-Gemini's mining), runs it again."""

from __future__ import annotations

import pytest
import torch
from conftest import lmms_eval_or_skip

from visionzip_tune.demo.tiny import save_tiny
from visionzip_tune.families import FAMILIES, apply_visionzip, family_of, projector_modules

lmms_eval_or_skip()
import test_batched  # noqa: E402
from test_batched import FRAMES, budget, losses, requests, spec  # noqa: E402

from visionzip_tune.evaluation.lmms import VisionZipModel, ZippedModel  # noqa: E402
from visionzip_tune.evaluation.tower_share import TowerShare  # noqa: E402

LOSS_TOLERANCE = 1e-5  # as for batching: the rows shared were computed in another batch
documents = test_batched.documents  # the same images of many sizes and frame-directory videos


class TowerUnits:
    """Counts the units (images, crops, frames; Qwen: patches) every tower of ``model`` is run on."""

    def __init__(self, model):
        family, inner = family_of(model), model.model
        self.seen = 0
        self.handles = [
            family.tower_stages(name, getattr(inner, name))[0].register_forward_pre_hook(self._count)
            for name in family.towers
        ]

    def _count(self, module, args):
        self.seen += len(args[0])

    def taken(self) -> int:
        seen, self.seen = self.seen, 0
        return seen


def answers(view: ZippedModel, docs: list[dict]):
    view.task_dict = {"t": {"test": docs}}
    texts = view.generate_until(requests(docs, "generate_until"))
    scored = view.loglikelihood(requests(docs, "loglikelihood"))
    return texts, losses(scored), [r.text[1] for r in scored]


def assert_same(shared, alone):
    assert shared[0] == alone[0]
    assert shared[1] == pytest.approx(alone[1], abs=LOSS_TOLERANCE, rel=0)
    assert shared[2] == alone[2]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_settings_at_one_budget_share_one_tower_pass_per_medium(family, documents, tmp_path):
    lm = VisionZipModel(
        pretrained=str(save_tiny(tmp_path / family, spec(family))),
        image_aspect="processor",
        video_frames=FRAMES,
        tower_share_gib=0,
        **budget(family),
    )
    model, prompter = lm.model, lm.prompter
    images, videos = documents
    docs = images + (videos if FAMILIES[family].has_video else [])
    towers = TowerUnits(model)

    def alone():  # no sharing: every request runs the tower
        return answers(ZippedModel(model, prompter, batch_size=4), docs)

    def generated_once() -> int:  # the units of every medium once: one generation request per document
        view = ZippedModel(model, prompter, batch_size=4)
        view.task_dict = {"t": {"test": docs}}
        view.generate_until(requests(docs, "generate_until"))
        return towers.taken()

    once = generated_once()
    share = TowerShare()
    reference = alone()
    towers.taken()
    training_free = answers(ZippedModel(model, prompter, batch_size=4, tower_share=share), docs)
    assert towers.taken() == once  # generation and both choices of each document: one pass per medium
    assert_same(training_free, reference)

    with torch.no_grad():  # a tuned projector: other weights after the frozen part (Mini-Gemini: and its mining)
        for module in projector_modules(model).values():
            for param in module.parameters():
                param.add_(0.05 * torch.randn_like(param))
    reference = alone()
    towers.taken()
    tuned = answers(ZippedModel(model, prompter, batch_size=4, tower_share=share), docs)
    assert towers.taken() == (once if family == "mini_gemini" else 0)
    assert_same(tuned, reference)
    assert tuned[1] != training_free[1]

    other = {k: v - 1 if isinstance(v, int) else v / 2 for k, v in budget(family).items()}
    apply_visionzip(model, **other)
    once = generated_once()
    reference = alone()
    towers.taken()
    assert_same(answers(ZippedModel(model, prompter, batch_size=4, tower_share=share), docs), reference)
    assert towers.taken() == once


def test_a_full_share_keeps_nothing_more_and_answers_the_same(documents, tmp_path):
    lm = VisionZipModel(pretrained=str(save_tiny(tmp_path / "llava", spec("llava"))), **budget("llava"))
    images, _ = documents
    towers = TowerUnits(lm.model)
    reference = answers(ZippedModel(lm.model, lm.prompter, batch_size=4), images)
    towers.taken()
    share = TowerShare(gib=1.5 * 7 * 32 * 4 / 2**30)  # room for one image's 7 rows of 32 float32 values, not two
    assert_same(answers(ZippedModel(lm.model, lm.prompter, batch_size=4, tower_share=share), images), reference)
    assert share.full and share.bytes == 7 * 32 * 4
    assert towers.taken() > len(images)  # the media not kept ran again for their second choice
