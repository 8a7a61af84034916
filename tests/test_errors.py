"""User errors reach the command line as their one-paragraph message, also from DataLoader worker processes."""

from __future__ import annotations

import pytest
import torch

from visionzip_tune.__main__ import main
from visionzip_tune.errors import UserError, user_message

MESSAGE = "data.json: sample id 7: unreadable image images/7.png: cannot identify image file"


class _BadData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        raise UserError(MESSAGE)


def test_a_worker_error_keeps_only_its_message():
    loader = torch.utils.data.DataLoader(_BadData(), num_workers=1)
    with pytest.raises(UserError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # what torch re-raises in the main process
    assert user_message(caught.value) == MESSAGE


def test_a_main_process_error_is_one_paragraph():
    assert user_message(UserError("bad\n   value  of x")) == "bad value of x"


def test_the_command_line_prints_the_message_and_exits_2(capsys):
    code = main(["train", "data.path=/does/not/exist.json", "data.image_folder=/does/not/exist", "--check"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: data.path: the data file /does/not/exist.json does not exist")
