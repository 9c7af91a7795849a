"""Inverting a classifier's trunk with each method: the method is an argument of each block's
inverse, not an attribute set on the blocks for a while."""

from __future__ import annotations

import torch

import iresnet
from iresnet.models import iresnet_classifier
from iresnet.report.reconstruct import reconstruct


def test_reconstruct_inverts_by_each_method_and_leaves_the_blocks_as_they_were() -> None:
    model = iresnet_classifier((1, 8, 8), 10, levels=17, blocks=(1, 1), hidden=(8, 8), inverse_method="anderson")
    images = torch.randint(0, 17, (4, 1, 8, 8))
    model(images)  # ActNorm's initialisation
    blocks = [m for m in model.modules() if isinstance(m, iresnet.ResidualBlock)]
    methods = []
    for block in blocks:
        inverse = block.inverse

        def recording(y, method=None, inverse=inverse):
            methods.append(method)
            return inverse(y, method=method)

        block.inverse = recording
    result = reconstruct(model, images)
    assert methods == ["fixed_point"] * len(blocks) + ["anderson"] * len(blocks)
    assert all(block.inverse_method == "anderson" for block in blocks)  # the model's own setting, untouched
    assert result.failure is None and result.max_error < 1e-3
    assert all(set(report.iterations) == {"fixed_point", "anderson"} for report in result.blocks)
