"""Subnormal floats flushed to zero while samkit trains or evaluates on a CPU, and the caller's setting
restored after (samkit/training/numerics.py)."""

from __future__ import annotations

import pytest
import torch

from samkit.training.config import config_from_dict
from samkit.training.numerics import flush_subnormals, flushing_subnormals
from samkit.training.train import train

from .conftest import SMALL_FRAME
from .datagen import make_coco_splits
from .test_train import make_config

SUBNORMAL = 1e-39  # below float32's smallest normal, 1.18e-38


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco_splits(tmp_path_factory.mktemp("coco"), train_images=6, val_images=4)


@pytest.fixture(autouse=True)
def default_setting():
    """Every test starts, and leaves the process, with torch's default: subnormals kept."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


def test_the_probe_reads_the_thread_setting():
    assert not flushing_subnormals()
    assert torch.set_flush_denormal(True)  # this CPU has the control bits (x86 with SSE3)
    assert flushing_subnormals()
    torch.set_flush_denormal(False)
    assert not flushing_subnormals()


def test_the_block_flushes_and_then_restores_the_callers_setting():
    x = torch.full((4,), SUBNORMAL)
    assert (x * 1.0).ne(0).all()
    with flush_subnormals(torch.device("cpu")):
        assert flushing_subnormals()
        assert (x * 1.0).eq(0).all()  # a subnormal operand reads as zero
        assert (torch.full((4,), 1e-20) * 1e-20).eq(0).all()  # a subnormal result is written as zero
    assert not flushing_subnormals()
    torch.set_flush_denormal(True)  # a caller who flushes already keeps flushing after the block
    with flush_subnormals(torch.device("cpu")):
        assert flushing_subnormals()
    assert flushing_subnormals()


def test_the_setting_is_restored_after_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with flush_subnormals(torch.device("cpu")):
            raise RuntimeError("boom")
    assert not flushing_subnormals()


def test_other_devices_leave_the_cpu_setting_alone():
    with flush_subnormals(torch.device("meta")):
        assert not flushing_subnormals()


def test_training_flushes_inside_and_restores_after(coco, small_frame_checkpoint, tmp_path, monkeypatch):
    from samkit.training import train as train_module

    seen: list[bool] = []
    inner = train_module._train

    def spy(*args, **kwargs):
        seen.append(flushing_subnormals())
        return inner(*args, **kwargs)

    monkeypatch.setattr(train_module, "_train", spy)
    cfg = make_config(coco, tmp_path / "run", small_frame_checkpoint, epochs=1, batch_size=2,
                      **{"model.image_size": SMALL_FRAME})  # fmt: skip
    train(config_from_dict(cfg))
    assert seen == [True]
    assert not flushing_subnormals()
