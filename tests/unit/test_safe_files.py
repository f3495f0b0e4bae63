"""No code runs from a checkpoint folder: links are followed and kept inside it, every pickle is scanned, and every
``torch.load`` made while DeepSpeed/accelerate restore a checkpoint is ``weights_only``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from linnaeus.engine.checkpoint import CheckpointManager
from linnaeus.engine.safe_files import verify_checkpoint_files, weights_only_loads
from linnaeus.errors import DataError


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint(tmp_path: Path) -> Path:
    """``<run>/checkpoints/step_4`` with a clean DeepSpeed-like subfolder and an accelerate RNG file."""
    step = tmp_path / "run" / "checkpoints" / "step_4"
    (step / "pytorch_model").mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, step / "pytorch_model" / "mp_rank_00_model_states.pt")
    torch.save({"step": 4}, step / "random_states_0.pkl")
    (step / "trainer_state.json").write_text('{"step": 4}')
    return step


def test_a_clean_folder_passes(tmp_path: Path) -> None:
    verify_checkpoint_files(_checkpoint(tmp_path))


def test_a_payload_in_a_symlinked_subfolder_is_refused(tmp_path: Path) -> None:
    """The attack of issue 26: `mv step_N/pytorch_model /x/evil; ln -s /x/evil step_N/pytorch_model`."""
    step = _checkpoint(tmp_path)
    evil = tmp_path / "elsewhere" / "evil"
    evil.parent.mkdir()
    (step / "pytorch_model").rename(evil)
    (step / "pytorch_model").symlink_to(evil, target_is_directory=True)
    marker = tmp_path / "PWNED"
    torch.save({"module": Payload(marker)}, evil / "mp_rank_00_model_states.pt")
    with pytest.raises(DataError) as err:
        verify_checkpoint_files(step)
    assert "\n" not in str(err.value) and "outside" in str(err.value) and "pytorch_model" in str(err.value)
    assert not marker.exists()


def test_a_payload_in_a_symlinked_subfolder_inside_the_checkpoints_is_still_scanned(tmp_path: Path) -> None:
    step = _checkpoint(tmp_path)
    other = step.parent / "shared_model"
    (step / "pytorch_model").rename(other)
    (step / "pytorch_model").symlink_to(other, target_is_directory=True)
    marker = tmp_path / "PWNED"
    torch.save({"module": Payload(marker)}, other / "mp_rank_00_model_states.pt")
    with pytest.raises(DataError, match=r"refers to posix\.system"):
        verify_checkpoint_files(step)
    assert not marker.exists()


def test_a_file_link_leaving_the_folder_is_refused_even_if_harmless(tmp_path: Path) -> None:
    step = _checkpoint(tmp_path)
    outside = tmp_path / "outside.pkl"
    torch.save({"step": 4}, outside)
    (step / "random_states_1.pkl").symlink_to(outside)
    with pytest.raises(DataError, match="outside"):
        verify_checkpoint_files(step)


def test_a_pickle_without_a_known_suffix_is_scanned(tmp_path: Path) -> None:
    step = _checkpoint(tmp_path)
    marker = tmp_path / "PWNED"
    torch.save(Payload(marker), step / "pytorch_model" / "extra_state")
    with pytest.raises(DataError, match=r"refers to posix\.system"):
        verify_checkpoint_files(step)
    assert not marker.exists()


def test_a_checkpoint_folder_that_is_itself_a_link_out_is_refused(tmp_path: Path) -> None:
    step = _checkpoint(tmp_path)
    away = tmp_path / "away"
    step.rename(away)
    step.symlink_to(away, target_is_directory=True)
    with pytest.raises(DataError, match="outside"):
        verify_checkpoint_files(step)


def test_a_whole_checkpoints_folder_on_scratch_space_still_loads(tmp_path: Path) -> None:
    step = _checkpoint(tmp_path)
    scratch = tmp_path / "scratch" / "checkpoints"
    scratch.parent.mkdir()
    step.parent.rename(scratch)
    step.parent.symlink_to(scratch, target_is_directory=True)
    verify_checkpoint_files(step)


def test_torch_load_inside_the_guard_never_unpickles_code(tmp_path: Path) -> None:
    """DeepSpeed's loader asks for ``weights_only=False``; inside ``weights_only_loads`` it gets True anyway, so a
    file swapped in after the scan still cannot run."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(marker)}, path)
    with pytest.raises(DataError) as err, weights_only_loads():
        torch.load(path, map_location="cpu", weights_only=False)
    assert "it would call posix.system" in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()
    # plain tensors load, and the guard is gone afterwards
    torch.save({"w": torch.ones(2)}, path)
    with weights_only_loads():
        assert torch.load(path, weights_only=False)["w"].sum() == 2
    assert torch.load.__name__ == "load"


def test_latest_pointer_may_only_name_a_step_folder(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / "latest").write_text("../../elsewhere/step_4\n")
    manager = CheckpointManager(root, keep_last=1, keep_best=1, best_metric="m", best_mode="max")
    with pytest.raises(DataError, match="not a step_<N> folder"):
        manager.latest()
