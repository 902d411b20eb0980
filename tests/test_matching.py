"""Match rules and the loss on hand-built feature maps, against values computed by hand."""

import math

import pytest
import torch

from sd4match.loss import gaussian_window_ce, gaussian_window_target
from sd4match.matching import MATCH_RULES, dense_match, match_cells, match_pixels, point_correlation, sample_descriptors


def one_hot_maps(h, w):
    """Feature maps whose cell (i, j) holds the one-hot vector e_{j*w+i}: every cell is unique."""
    f = torch.eye(h * w).reshape(h * w, h, w)[None]
    return f


@pytest.mark.parametrize("rule", MATCH_RULES)
def test_one_hot_lands_on_its_cell(rule):
    h, w = 6, 8
    src, trg = one_hot_maps(h, w), one_hot_maps(h, w)
    cells = torch.tensor([[[0.5, 0.5], [3.5, 2.5], [7.5, 5.5]]])
    corr = point_correlation(src, trg, cells)
    out, score = match_cells(corr, rule)
    torch.testing.assert_close(out, cells, atol=1e-4, rtol=0)
    torch.testing.assert_close(score, torch.ones(1, 3))


def test_sample_descriptors_bilinear_between_cells():
    f = torch.zeros(1, 1, 2, 2)
    f[0, 0, 0, 1] = 1.0  # cell (x=1, y=0)
    # halfway between the centres of cells (0, 0) and (1, 0): 0.5
    d = sample_descriptors(f, torch.tensor([[[1.0, 0.5], [1.5, 0.5], [0.5, 0.5]]]))
    torch.testing.assert_close(d[0, :, 0], torch.tensor([0.5, 1.0, 0.0]))


def two_peaks(h=48, w=48, a=(10, 10), b=(40, 40), va=1.0, vb=0.9):
    corr = torch.zeros(1, 1, h, w)
    corr[0, 0, a[1], a[0]] = va
    corr[0, 0, b[1], b[0]] = vb
    return corr


def test_two_peaks_nn_picks_the_higher():
    out, score = match_cells(two_peaks(), "nn")
    assert out[0, 0].tolist() == [10.5, 10.5] and score.item() == 1.0


def test_kernel_softargmax_suppresses_far_second_peak():
    corr = two_peaks()
    T = 0.04
    # by hand: softmax weights exp(v / T) of the two peaks and the 2302 zero cells
    ea, eb, rest = math.exp(1.0 / T), math.exp(0.9 / T), 2302.0
    # expectation of cell centres; zero cells average to the grid centre (24, 24)
    z = ea + eb + rest
    expected = (ea * 10.5 + eb * 40.5 + rest * 24.0) / z
    soft, _ = match_cells(corr, "softargmax", temperature=T)
    assert soft[0, 0, 0].item() == pytest.approx(expected, abs=1e-4)
    assert soft[0, 0, 0].item() > 10.5 + 2.0  # pulled about 2.3 cells towards the second peak
    kern, _ = match_cells(corr, "kernel-softargmax", temperature=T, sigma=7.0)
    # the window weight at the second peak is exp(-(30^2 + 30^2) / (2 * 49)) ~ 1e-8
    assert kern[0, 0].tolist() == pytest.approx([10.5, 10.5], abs=0.01)


def test_softargmax_locates_sub_cell_peak():
    h, w = 32, 32
    mu = torch.tensor([12.3, 20.7])
    xs = torch.arange(w) + 0.5
    ys = torch.arange(h) + 0.5
    d2 = (xs.view(1, w) - mu[0]) ** 2 + (ys.view(h, 1) - mu[1]) ** 2
    corr = torch.exp(-d2 / (2 * 3.0**2))[None, None]  # a smooth bump, peak between cells
    soft, _ = match_cells(corr, "softargmax", temperature=0.04)
    assert (soft[0, 0] - mu).abs().max().item() < 0.05
    kern, _ = match_cells(corr, "kernel-softargmax", temperature=0.04)
    assert (kern[0, 0] - mu).abs().max().item() < 0.05
    nn, _ = match_cells(corr, "nn")
    assert nn[0, 0].tolist() == [12.5, 20.5]  # nearest neighbour is stuck on cell centres


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown match rule 'argmax'"):
        match_cells(torch.zeros(1, 1, 2, 2), "argmax")


def test_loss_by_hand_on_4x4_grid():
    corr = torch.tensor([[0.1, 0.2, 0.0, -0.1], [0.3, 0.9, 0.4, 0.0], [0.2, 0.5, 0.8, 0.1], [0.0, 0.1, 0.2, 0.3]])
    gt = (1.3, 2.6)  # cells: inside cell (x=1, y=2)
    T, sigma, size = 0.04, 1.5, 3
    # hand computation with plain Python: window of 3 x 3 cells around (1, 2), clipped to the grid
    weights = {}
    for y in range(4):
        for x in range(4):
            if abs(x - 1) <= 1 and abs(y - 2) <= 1:
                weights[(x, y)] = math.exp(-((x + 0.5 - gt[0]) ** 2 + (y + 0.5 - gt[1]) ** 2) / (2 * sigma**2))
    total = sum(weights.values())
    lse = math.log(sum(math.exp(corr[y, x].item() / T) for y in range(4) for x in range(4)))
    expected = -sum(wt / total * (corr[y, x].item() / T - lse) for (x, y), wt in weights.items())
    loss = gaussian_window_ce(corr[None, None], torch.tensor([[gt]]), temperature=T, size=size, sigma=sigma)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_masks_padding_and_outside_points():
    corr = torch.randn(1, 3, 5, 5)
    gt = torch.tensor([[[2.2, 2.7], [9.0, 1.0], [1.1, 1.1]]])  # the second lies outside the grid
    valid = torch.tensor([[True, True, False]])  # the third is padding
    full = gaussian_window_ce(corr, gt, valid)
    only_first = gaussian_window_ce(corr[:, :1], gt[:, :1])
    assert full.item() == pytest.approx(only_first.item(), rel=1e-6)
    q = gaussian_window_target(gt, 5, 5)
    assert q[0, 0].sum().item() == pytest.approx(1.0)
    assert q[0, 0].argmax().item() == 2 * 5 + 2  # peak at the cell holding the ground truth


def test_match_pixels_through_cell_maps():
    from sd4match.features.base import CellMap

    class Grid:  # a featurizer stand-in: only the cell mapping is used
        def cell_map(self, size):
            return CellMap(size, (8, 6))

    f = one_hot_maps(6, 8)
    # source 400 x 300 px, point in cell (2, 3) centre: x = 2.5 * 50, y = 3.5 * 50
    out = match_pixels(Grid(), f[0], f[0], [[125.0, 175.0]], (400, 300), (160, 120), rule="nn")
    # target 160 x 120: cell (2, 3) centre is at (2.5 * 20, 3.5 * 20)
    assert out["kps"].tolist() == [[50.0, 70.0]] and out["scores"].tolist() == [1.0]


def test_dense_match_and_mutual_filter():
    h, w = 4, 5
    src = one_hot_maps(h, w)
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(0))
    trg = src.reshape(1, h * w, h * w)[:, :, perm].reshape(1, h * w, h, w)  # target cell k holds source cell perm[k]
    out = dense_match(src, trg, "nn")
    inv = torch.argsort(perm)
    expect = torch.stack([(inv % w).float() + 0.5, (inv // w).float() + 0.5], dim=-1)
    torch.testing.assert_close(out["cells"][0], expect)
    assert out["mutual"].all()
    # two source cells share one descriptor: only the first keeps a mutual match
    src2 = src.clone()
    src2[0, :, 0, 1] = src2[0, :, 0, 0]
    filt = dense_match(src2, src, "nn", mutual=True)
    assert filt["mutual"][0, :2].tolist() == [True, False] and filt["scores"][0, 1].item() == 0.0
