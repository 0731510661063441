"""The training DataLoader lives for the whole run (workers persist across epochs): each epoch's batches
and per-epoch randomness still reach the workers, so any worker count trains exactly as none."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset

from samkit.training.config import config_from_dict
from samkit.training.setup import EpochBatches, EpochIndexed, set_epoch
from samkit.training.train import train

from .test_train import coco, final_state, losses_of, make_config  # noqa: F401


class EpochEcho(Dataset):
    """Sample i of epoch e is (e, i, the reading process's pid)."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> tuple[int, int, int]:
        return self.epoch, index, os.getpid()


def test_persistent_workers_see_each_epoch_and_are_not_restarted():
    sampler = EpochBatches()
    loader = DataLoader(EpochIndexed(EpochEcho()), batch_sampler=sampler, num_workers=2,
                        persistent_workers=True, collate_fn=list)  # fmt: skip
    pids = []
    for epoch, batches in enumerate([[[0, 1], [2, 3], [4, 5]], [[5, 4], [3]], [[1], [0, 2]]]):
        sampler.set(epoch, batches)
        seen = [sample for batch in loader for sample in batch]
        assert [(e, i) for e, i, _ in seen] == [(epoch, i) for b in batches for i in b]
        pids.append({pid for _, _, pid in seen})
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2] and os.getpid() not in pids[0]


def test_epoch_indexed_sets_the_epoch_in_the_reading_process():
    data = EpochIndexed(EpochEcho())
    assert data[(3, 1)][:2] == (3, 1) and data.dataset.epoch == 3
    set_epoch(data, 5)  # reaches the wrapped dataset like any wrapper
    assert data.dataset.epoch == 5


def test_two_workers_train_exactly_as_none(coco, tmp_path):  # noqa: F811
    """3 epochs, 8 images of up to 8 objects with max_objects 2 and box jitter: each epoch draws other
    objects and boxes per image, in the main process or in workers started in epoch 0."""
    runs = {}
    for workers in (0, 2):
        cfg = make_config(coco, tmp_path / f"w{workers}", None, epochs=3, batch_size=4,
                          **{"model.image_size": 256, "train_data.num_workers": workers,
                             "train_data.max_objects": 2, "train_data.box_jitter": 20})  # fmt: skip
        torch.manual_seed(0)
        train(config_from_dict(cfg))
        runs[workers] = (losses_of(tmp_path / f"w{workers}"), final_state(tmp_path / f"w{workers}"))
    assert len(runs[0][0]) == 3 and runs[0][0] == runs[2][0]  # one step per epoch
    for key, value in runs[0][1].items():
        assert torch.equal(value, runs[2][1][key]), key
