"""Pruning criteria and masks: known cases."""
import pytest
import torch

from sparsify.passes.analysis import criteria
from sparsify.patterns import NM, Block, Unstructured


def test_wanda_and_magnitude_differ_on_a_known_case():
    # Row 0: w = [1.0, 0.5]; input feature 1 has a 10x larger norm. Magnitude drops column 1,
    # Wanda (|w| * ||x||) drops column 0: 1.0*1 < 0.5*10.
    w = torch.tensor([[1.0, 0.5], [0.2, 3.0]])
    norm = torch.tensor([1.0, 10.0])
    mag = criteria.unstructured_mask(criteria.scores(w, "magnitude"), 0.5, per_row=True)
    wanda = criteria.unstructured_mask(criteria.scores(w, "wanda", norm), 0.5, per_row=True)
    assert mag.tolist() == [[True, False], [False, True]]
    assert wanda.tolist() == [[False, True], [False, True]]


def test_wanda_needs_calibration_norms():
    with pytest.raises(ValueError, match="calibration"):
        criteria.scores(torch.randn(3, 4), "wanda")


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_nm_masks_really_are_nm_and_keep_the_largest(n, m):
    torch.manual_seed(0)
    w = torch.randn(7, 37)  # K not a multiple of m: the last group is partial
    mask = criteria.mask_for(NM(n, m), w.abs())
    pad = (-w.shape[1]) % m
    groups = torch.nn.functional.pad(mask, (0, pad)).view(7, -1, m)
    assert (groups.sum(-1) <= n).all()
    assert (groups[:, :-1].sum(-1) == n).all()  # full groups keep exactly n
    wa = torch.nn.functional.pad(w.abs(), (0, pad)).view(7, -1, m)
    kept_min = torch.where(groups, wa, torch.inf).amin(-1)
    dropped_max = torch.where(groups, -torch.inf, wa).amax(-1)
    assert (kept_min[:, :-1] >= dropped_max[:, :-1]).all()


def test_block_mask_keeps_whole_blocks_at_the_density():
    torch.manual_seed(1)
    w = torch.randn(64, 96)
    mask = criteria.mask_for(Block(16, 0.25), w.abs())
    tiles = mask.view(4, 16, 6, 16).permute(0, 2, 1, 3).reshape(24, -1)
    assert ((tiles.all(1)) | (~tiles.any(1))).all(), "blocks are kept or dropped whole"
    assert int(tiles.all(1).sum()) == 6


def test_unstructured_global_sparsity_and_random_baseline_is_seeded():
    w = torch.randn(10, 20)
    mask = criteria.mask_for(Unstructured(0.7), w.abs())
    assert abs(1 - mask.float().mean().item() - 0.7) < 1e-6
    a = criteria.scores(w, "random", seed=3)
    assert torch.equal(a, criteria.scores(w, "random", seed=3))
    assert not torch.equal(a, criteria.scores(w, "random", seed=4))
