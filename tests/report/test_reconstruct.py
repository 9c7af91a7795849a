"""Inverting a classifier's trunk with each method (the method is an argument of each block's
inverse, not an attribute set on the blocks for a while), and an image flow from its latents."""

from __future__ import annotations

import pytest
import torch

import iresnet
from iresnet.models import image_flow, iresnet_classifier
from iresnet.report.reconstruct import reconstruct, reconstruct_flow


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


@pytest.mark.parametrize("block", ["resflow", "monotone", "implicit"])
def test_an_image_flow_reconstructs_its_images_exactly(block: str) -> None:
    """Test images to the latent and back, rounded to levels: every one comes back, each branch
    reports its certificate, and each block the iterations of its inverse."""
    torch.manual_seed(0)
    model = image_flow((1, 8, 8), 17, scales=2, blocks=1, hidden=8, fc_blocks=1, fc_hidden=16, block=block)
    images = torch.randint(0, 17, (6, 1, 8, 8))
    model(images)  # ActNorm's initialisation
    result = reconstruct_flow(model, images)
    assert result.failure is None and result.images is not None
    assert result.exact == 6 and torch.equal(result.images, images.to(result.images))
    assert result.pixels_exact == 1.0 and result.max_level_error == 0
    assert result.max_error is not None and result.max_error < 1e-4
    branches = 2 if block == "implicit" else 1
    assert len(result.blocks) == 3 * branches  # two conv blocks and one fully-connected
    for index in range(3):  # an implicit block's inverse solves for x: its g_x branch reports the iterations
        assert any(b.iterations for b in result.blocks if b.index == index)
    assert all(b.certified <= b.design * (1 + 1e-6) for b in result.blocks if b.design is not None)


def test_a_flow_whose_inverse_fails_is_reported_not_raised() -> None:
    model = image_flow((1, 8, 8), 17, scales=2, blocks=1, hidden=8, fc_blocks=1, fc_hidden=16)
    images = torch.randint(0, 17, (4, 1, 8, 8))
    model(images)
    for block in model.modules():
        if isinstance(block, iresnet.ResidualBlock):
            block.max_iter, block.atol, block.rtol = 1, 1e-12, 0.0
    result = reconstruct_flow(model, images)
    assert result.images is None and result.exact == 0
    assert result.failure is not None and "fixed-point inversion" in result.failure
