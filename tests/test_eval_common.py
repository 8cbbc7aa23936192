"""The evaluation plumbing: batch assignment across ranks, image batches from datasets."""

from __future__ import annotations

import torch
from helpers import pixels

from blip.distributed import my_batches
from blip.eval.common import image_batches


# ---- tests of the plumbing ---------------------------------------------------------------------------------------
def test_batches_are_round_robin_and_cover_everything():
    assert my_batches(10, 3, 0, 1) == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    r0, r1 = my_batches(10, 3, 0, 2), my_batches(10, 3, 1, 2)
    assert r0 == [range(0, 3), range(6, 9)] and r1 == [range(3, 6), range(9, 10)]
    assert my_batches(2, 3, 1, 2) == []


def test_image_batches_from_a_dataset_keep_batch_boundaries():
    px = pixels(7, size=8)
    ds = torch.utils.data.TensorDataset(px)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i][0]

    for rank in (0, 1):
        got = list(image_batches(Items(), 2, rank, 2))
        want = list(image_batches(px, 2, rank, 2))
        assert [r for r, _ in got] == [r for r, _ in want]
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert torch.equal(a, b)
