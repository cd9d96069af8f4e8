"""`dualmode tutorial --checkpoint DIR`: a run stopped and restarted ends exactly where one straight run ends."""

from __future__ import annotations

import io
import shutil

import pytest
import torch

from dualmode.step import checkpoint
from tests.apps.test_tutorial import run_cli
from tests.steps import assert_bitwise

QUICK = ["--mode", "eager", "--batch-size", "32", "--width-mult", "0.25", "--bn-batches", "1", "--decay-every", "2",
         "--checkpoint-every", "2"]


def saved(path) -> dict:
    return torch.load(io.BytesIO(checkpoint.read_payload(path)), weights_only=True)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Four steps without stopping, a checkpoint every 2 steps (the folder)."""
    folder = tmp_path_factory.mktemp("straight")
    code, _, err = run_cli("tutorial", *QUICK, "--max-steps", "4", "--checkpoint", str(folder))
    assert code == 0, err
    return folder


def test_a_restarted_run_resumes_and_ends_where_a_straight_run_ends(tmp_path, straight_run):
    split = tmp_path / "split"
    code, out, err = run_cli("tutorial", *QUICK, "--max-steps", "1", "--checkpoint", str(split))
    assert code == 0, err
    assert "resumed" not in out
    assert saved(split / "eager.ckpt")["extra"]["steps_done"] == 1  # at the end, between the every-2 saves
    code, out, err = run_cli("tutorial", *QUICK, "--max-steps", "4", "--checkpoint", str(split))
    assert code == 0, err
    assert f"resumed from {split / 'eager.ckpt'} after step 1 of 4" in out
    a, b = saved(straight_run / "eager.ckpt"), saved(split / "eager.ckpt")
    assert a["extra"]["steps_done"] == b["extra"]["steps_done"] == 4
    assert len(b["extra"]["losses"]) == 4
    assert_bitwise(a["extra"]["losses"], b["extra"]["losses"], "losses")
    assert_bitwise(a["state"]["modules"], b["state"]["modules"], "model")
    assert_bitwise(a["state"]["optimizer"], b["state"]["optimizer"], "optimizer")  # the decayed lrs too
    assert_bitwise(a["rng"]["torch"], b["rng"]["torch"], "torch RNG")


def test_a_restart_with_other_settings_is_refused_by_name(tmp_path, straight_run):
    folder = tmp_path / "run"
    shutil.copytree(straight_run, folder)
    code, out, err = run_cli("tutorial", *QUICK, "--max-steps", "6", "--lr", "0.05", "--checkpoint", str(folder))
    assert code == 2
    assert "was written by a run with other settings: lr 0.1 (now 0.05)" in err
    assert "loss:" not in out.split("=== eager mode ===")[-1]
    assert saved(folder / "eager.ckpt")["extra"]["steps_done"] == 4  # the checkpoint is left as it was


def test_a_checkpoint_folder_that_is_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    code, out, err = run_cli("tutorial", *QUICK, "--checkpoint", str(tmp_path / "file"))
    assert code == 2 and "--checkpoint " + str(tmp_path / "file") + ": not a folder" in err
    assert "Epoch 1" not in out
