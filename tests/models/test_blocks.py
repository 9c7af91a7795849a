"""The ``block`` option of the flow builders (:mod:`iresnet.models.blocks`): each kind builds its
blocks, the flows they make are invertible with log-likelihoods that match the brute-force
Jacobian in float64, and the digits presets of the family match the digits preset's size."""

from __future__ import annotations

import pytest
import torch

import iresnet
from helpers import jacobian_logdet
from iresnet.models import image_flow, toy_flow
from iresnet.models.blocks import BLOCKS, flow_block
from iresnet.models.build import build_model
from iresnet.train.presets import PRESETS

KINDS = {
    "resflow": iresnet.ResidualBlock,
    "densenet": iresnet.ResidualBlock,
    "monotone": iresnet.MonotoneBlock,
    "implicit": iresnet.ImplicitBlock,
}


def flow_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks the builder made: the outermost residual, monotone or implicit blocks."""
    found = [m for m in model.modules() if isinstance(m, (iresnet.ResidualBlock, iresnet.ImplicitBlock))]
    inner = {id(m) for b in found if isinstance(b, iresnet.ImplicitBlock) for m in (b.explicit, b.implicit)}
    return [m for m in found if id(m) not in inner]


def test_every_kind_has_its_class() -> None:
    assert set(KINDS) == set(BLOCKS)


@pytest.mark.parametrize("block", BLOCKS)
def test_toy_flow_builds_its_kind_of_block(block: str) -> None:
    model = toy_flow(2, blocks=3, hidden=8, block=block)
    blocks = flow_blocks(model)
    assert len(blocks) == 3 and all(type(b) is KINDS[block] for b in blocks)
    assert model(torch.randn(5, 2)).shape == (5,)


@pytest.mark.parametrize("block", BLOCKS)
def test_image_flow_builds_its_kind_of_block(block: str) -> None:
    model = image_flow((1, 8, 8), 17, scales=2, blocks=1, hidden=8, fc_blocks=1, fc_hidden=8, block=block)
    blocks = flow_blocks(model)
    assert len(blocks) == 3 and all(type(b) is KINDS[block] for b in blocks)
    assert model(torch.randint(0, 17, (3, 1, 8, 8))).shape == (3,)


def test_implicit_blocks_have_two_branches_and_twice_the_parameters() -> None:
    plain, implicit = toy_flow(2, blocks=2, hidden=8), toy_flow(2, blocks=2, hidden=8, block="implicit")
    branch_parameters = sum(p.numel() for b in flow_blocks(plain) for p in b.g.parameters())
    implicit_parameters = sum(p.numel() for b in flow_blocks(implicit) for p in b.parameters())
    assert implicit_parameters == 2 * branch_parameters
    block = flow_blocks(implicit)[0]
    assert block.explicit.g is not block.implicit.g


@pytest.mark.parametrize("block", ["monotone", "implicit"])
def test_aol_layers_serve_the_new_blocks(block: str) -> None:
    model = toy_flow(2, blocks=1, hidden=8, block=block, lipschitz="aol")
    assert any(isinstance(m, iresnet.AOL) for m in model.modules())
    assert not any(isinstance(m, iresnet.SpectralNorm) for m in model.modules())


@pytest.mark.parametrize("block", BLOCKS)
def test_toy_flow_log_likelihood_is_the_change_of_variables_in_float64(block: str) -> None:
    """log p(x) = log N(F(x)) + log|det J_F(x)|, J_F by brute force through every solve; and the
    inverse gives x back."""
    model = toy_flow(2, blocks=2, hidden=8, block=block, max_iter=500).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    iresnet.initialize_from_data(model, x)
    model.eval()
    iresnet.converge_spectral_norms(model)
    z, _ = model.transform(x)
    expected = model.prior().log_prob(z) + jacobian_logdet(model.transform, x)
    torch.testing.assert_close(model(x), expected, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(model.transform.inverse(z), x, rtol=1e-8, atol=1e-8)


def test_flow_block_refuses_an_uncertified_branch_for_every_kind() -> None:
    def branch() -> torch.nn.Module:
        return torch.nn.Sequential(iresnet.spectral_norm(torch.nn.Linear(2, 2), 1.5))

    for block in BLOCKS:
        with pytest.raises(ValueError, match="Lip\\(g\\) < 1"):
            flow_block(block, branch, "exact")


FAMILY = ["digits-aol", "digits-densenet", "digits-monotone", "digits-implicit"]


@pytest.mark.parametrize("name", FAMILY)
def test_family_presets_match_the_digits_preset(name: str) -> None:
    """The same data and training as ``digits``; parameters within 2 % of its 254,222."""
    preset, digits = PRESETS[name], PRESETS["digits"]
    assert {k: v for k, v in preset.items() if k != "model"} == {k: v for k, v in digits.items() if k != "model"}
    count = sum(p.numel() for p in build_model("density", "digits", preset["model"]).parameters())
    reference = sum(p.numel() for p in build_model("density", "digits", digits["model"]).parameters())
    assert abs(count - reference) <= 0.02 * reference
    model = build_model("density", "digits", preset["model"])
    expected = preset["model"].get("block", "resflow")
    assert {type(b) for b in flow_blocks(model)} == {KINDS[expected]}
