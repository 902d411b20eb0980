"""Match rules, coordinates and the loss against DESIGN.md's formulas ("The official method,
exactly"), with expected values computed by hand or by a few lines of plain Python here."""

import math

import numpy as np
import pytest
import torch

from sd4match.features.base import CellMap
from sd4match.loss import gaussian_window_ce
from sd4match.matching import MATCH_RULES, dense_match, match, match_cells, match_pixels, point_correlation, sample_descriptors


def one_hot_maps(h, w):
    """Feature maps whose cell (i, j) holds the one-hot vector e_{j*w+i}: every cell is unique."""
    return torch.eye(h * w).reshape(h * w, h, w)[None]


def permuted(src, perm):
    """Target cell k holds the descriptor of source cell perm[k]."""
    b, c, h, w = src.shape
    return src.reshape(b, c, h * w)[:, :, perm].reshape(b, c, h, w)


# ---------------------------------------------------------------------------- independent references
def ref_softmax_expectation(s, T):
    """sum softmax(s / T) * (x, y) over the integer grid, in float64 numpy."""
    s = np.asarray(s, dtype=np.float64)
    e = np.exp((s - s.max()) / T)
    p = e / e.sum()
    ys, xs = np.mgrid[0 : s.shape[0], 0 : s.shape[1]]
    return np.array([(p * xs).sum(), (p * ys).sum()])


def ref_kernel_softargmax(s, T, sigma):
    s = np.asarray(s, dtype=np.float64)
    iy, ix = np.unravel_index(np.argmax(s), s.shape)
    ys, xs = np.mgrid[0 : s.shape[0], 0 : s.shape[1]]
    g = np.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma**2))
    return ref_softmax_expectation(g * s, T)


def ref_bilinear(P, x, y):
    """grid_sample(bilinear, align_corners=True, border) of a 2-D array at (x, y)."""
    h, w = P.shape
    x, y = min(max(x, 0.0), w - 1.0), min(max(y, 0.0), h - 1.0)
    x0, y0 = int(math.floor(x)), int(math.floor(y))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    fx, fy = x - x0, y - y0
    return (P[y0, x0] * (1 - fx) * (1 - fy) + P[y0, x1] * fx * (1 - fy) + P[y1, x0] * (1 - fx) * fy + P[y1, x1] * fx * fy)


# ---------------------------------------------------------------------------- rules
@pytest.mark.parametrize("rule", MATCH_RULES)
@pytest.mark.parametrize("hw", [(6, 8), (5, 3)])
def test_one_hot_lands_on_its_integer_cell(rule, hw):
    h, w = hw
    src = one_hot_maps(h, w)
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(1))
    trg = permuted(src, perm)
    cells = torch.tensor([[[0.0, 0.0], [2.0, 1.0], [w - 1.0, h - 1.0]]])
    out = match(src, trg, cells, rule)
    inv = torch.argsort(perm)  # where each source cell went in the target
    want = torch.tensor([[[float(inv[int(y * w + x)] % w), float(inv[int(y * w + x)] // w)] for x, y in cells[0].tolist()]])
    torch.testing.assert_close(out["cells"], want, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["scores"], torch.ones(1, 3), atol=1e-5, rtol=0)


def test_sample_descriptors_align_corners_and_zero_padding():
    f = torch.zeros(1, 1, 2, 3)
    f[0, 0, 0, 0] = 1.0  # cell (x=0, y=0)
    f[0, 0, 0, 1] = 3.0  # cell (x=1, y=0)
    pts = torch.tensor([[[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [-0.5, 0.0], [0.5, 0.5]]])
    d = sample_descriptors(f, pts)[0, :, 0]
    # by hand: integer points are the cells; halfway = mean; half a cell outside blends with 0
    torch.testing.assert_close(d, torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0]))


def peaks_map(h, w, peaks):
    s = torch.zeros(h, w)
    for (x, y), v in peaks.items():
        s[y, x] = v
    return s


@pytest.mark.parametrize("hw", [(48, 48), (30, 40)])
def test_kernel_softargmax_ignores_a_far_second_peak_that_pulls_softargmax(hw):
    h, w = hw
    s = peaks_map(h, w, {(10, 10): 0.70, (19, 10): 0.67})  # 9 cells apart, the case
    T, sigma = 0.04, 7.0
    soft, score = match_cells(s[None, None], "softargmax", temperature=T)
    kern, _ = match_cells(s[None, None], "kernel-softargmax", temperature=T, sigma=sigma)
    np.testing.assert_allclose(soft[0, 0].numpy(), ref_softmax_expectation(s.numpy(), T), atol=1e-4)
    np.testing.assert_allclose(kern[0, 0].numpy(), ref_kernel_softargmax(s.numpy(), T, sigma), atol=1e-4)
    assert abs(kern[0, 0, 0].item() - 10.0) < 0.05 and abs(kern[0, 0, 1].item() - 10.0) < 0.05
    assert soft[0, 0, 0].item() > 12.0  # plain soft-argmax is pulled ~2.9 cells towards the second peak
    assert score.item() == pytest.approx(0.70)


def test_kernel_multiplies_the_raw_cosine_not_the_probabilities():
    """A window applied after the softmax (the old rule) gives another answer: the official one
    shrinks the far peak's cosine before the softmax."""
    h, w = 20, 20
    s = peaks_map(h, w, {(5, 5): 0.9, (12, 5): 0.85})
    T, sigma = 0.04, 7.0
    kern, _ = match_cells(s[None, None], "kernel-softargmax", temperature=T, sigma=sigma)
    ref = ref_kernel_softargmax(s.numpy(), T, sigma)
    e = np.exp(s.numpy().astype(np.float64) / T)
    ys, xs = np.mgrid[0:h, 0:w]
    q = e / e.sum() * np.exp(-((xs - 5) ** 2 + (ys - 5) ** 2) / (2 * sigma**2))
    after = np.array([(q * xs).sum(), (q * ys).sum()]) / q.sum()
    np.testing.assert_allclose(kern[0, 0].numpy(), ref, atol=1e-4)
    assert abs(after[0] - ref[0]) > 0.5  # the two orders really differ here


def test_nn_takes_the_integer_argmax():
    s = peaks_map(7, 9, {(3, 2): 0.8, (7, 6): 0.79})
    out, score = match_cells(s[None, None], "nn")
    assert out[0, 0].tolist() == [3.0, 2.0] and score.item() == pytest.approx(0.8)


@pytest.mark.parametrize("query", [(1.3, 2.6), (0.0, 0.0), (-0.4, 1.5), (4.0, 3.0), (3.9999999, 0.5)])
def test_bilinear_blends_the_nn_matches_of_the_four_corners(query):
    h, w = 4, 5  # source grid; the target is a permutation of it on a 5 x 4 grid
    src = one_hot_maps(h, w)
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(3))
    trg = permuted(src, perm).reshape(1, h * w, w, h)  # another shape, same cells
    inv = torch.argsort(perm).tolist()

    def nn_of(x, y):  # where source cell (x, y) sits in the 4-wide target
        k = inv[y * w + x]
        return np.array([k % h, k // h], dtype=np.float64)

    # by hand, DESIGN.md 2: clamp into [1e-5, size - 1 - 1e-5] (only values <= 0 or >= size - 1 move)
    qx, qy = query
    qx = 1e-5 if qx <= 0 else (w - 1 - 1e-5 if qx >= w - 1 else qx)
    qy = 1e-5 if qy <= 0 else (h - 1 - 1e-5 if qy >= h - 1 else qy)
    x0, y0 = math.floor(qx), math.floor(qy)
    fx, fy = qx - x0, qy - y0
    want = (nn_of(x0, y0) * (1 - fx) * (1 - fy) + nn_of(x0 + 1, y0) * fx * (1 - fy) + nn_of(x0, y0 + 1) * (1 - fx) * fy
            + nn_of(x0 + 1, y0 + 1) * fx * fy)
    out = match(src, trg, torch.tensor([[query]], dtype=torch.float32), "bilinear")
    np.testing.assert_allclose(out["cells"][0, 0].numpy(), want, atol=1e-4)


def test_bilinear_needs_feature_maps_and_unknown_rules_are_refused():
    with pytest.raises(ValueError, match="bilinear"):
        match_cells(torch.zeros(1, 1, 2, 2), "bilinear")
    with pytest.raises(ValueError, match="unknown match rule 'argmax'"):
        match_cells(torch.zeros(1, 1, 2, 2), "argmax")


def test_cosine_uses_the_official_normalisation():
    src = torch.tensor([[[[3.0]], [[4.0]]]])  # (1, 2, 1, 1): norm 5
    trg = torch.tensor([[[[3.0]], [[4.0]]]])
    c = point_correlation(src, trg, torch.zeros(1, 1, 2))
    assert c.item() == pytest.approx((25 / (5 + 1e-6) ** 2), abs=1e-7)


# ---------------------------------------------------------------------------- coordinates
@pytest.mark.parametrize("size", [(768, 768), (500, 375), (300, 640)])
def test_sd_cell_map_is_the_official_align_corners_mapping(size):
    W, H = size
    R, g = 768, 48
    cm = CellMap.corners((W, H), (g, g), R)
    px = np.array([[0.0, 0.0], [W / 2, H / 3], [W - 1.0, H - 1.0], [W, H]])
    # by hand: x' = x * R / W, then cell = x' * (w - 1) / (R - 1)
    want = np.stack([px[:, 0] * R / W * (g - 1) / (R - 1), px[:, 1] * R / H * (g - 1) / (R - 1)], axis=-1)
    np.testing.assert_allclose(cm.pixel_to_cell(px), want, rtol=1e-12)
    np.testing.assert_allclose(cm.cell_to_pixel(cm.pixel_to_cell(px)), px, atol=1e-9)
    t = torch.tensor(px, dtype=torch.float32)
    torch.testing.assert_close(cm.cell_to_pixel(cm.pixel_to_cell(t)), t, atol=1e-3, rtol=0)
    # the working frame's corners are the grid's corner cells
    np.testing.assert_allclose(cm.pixel_to_cell([[(R - 1) * W / R, (R - 1) * H / R]]), [[g - 1, g - 1]], atol=1e-9)


@pytest.mark.parametrize("size", [(400, 300), (123, 457)])
def test_centre_cell_map_puts_cell_i_at_its_pixel_centre(size):
    W, H = size
    cm = CellMap.centres((W, H), (8, 6))
    # cell (i, j) covers [i W/8, (i+1) W/8): its centre (i + 0.5) W / 8 maps to the integer i
    np.testing.assert_allclose(cm.pixel_to_cell([[2.5 * W / 8, 3.5 * H / 6]]), [[2.0, 3.0]], atol=1e-12)
    px = np.array([[0.0, 0.0], [W * 0.37, H * 0.81], [W, H]])
    np.testing.assert_allclose(cm.cell_to_pixel(cm.pixel_to_cell(px)), px, atol=1e-9)


def test_match_pixels_through_cell_maps():
    class Grid:  # a featurizer stand-in: only the cell mapping is used
        def cell_map(self, size):
            return CellMap.centres(size, (8, 6))

    f = one_hot_maps(6, 8)
    # source 400 x 300 px, point at the centre of cell (2, 3): x = 2.5 * 50, y = 3.5 * 50
    out = match_pixels(Grid(), f[0], f[0], [[125.0, 175.0]], (400, 300), (160, 120), rule="nn")
    # target 160 x 120: cell (2, 3) centre is at (2.5 * 20, 3.5 * 20)
    np.testing.assert_allclose(out["kps"].numpy(), [[50.0, 70.0]], atol=1e-4)
    assert out["scores"].tolist() == pytest.approx([1.0], abs=1e-5)


def test_dense_match_and_mutual_filter():
    h, w = 4, 5
    src = one_hot_maps(h, w)
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(0))
    trg = permuted(src, perm)
    out = dense_match(src, trg, "nn")
    inv = torch.argsort(perm)
    expect = torch.stack([(inv % w).float(), (inv // w).float()], dim=-1)
    torch.testing.assert_close(out["cells"][0], expect)
    assert out["mutual"].all()
    for rule in MATCH_RULES:  # every rule puts a unique descriptor on its own cell
        torch.testing.assert_close(dense_match(src, trg, rule)["cells"][0], expect, atol=1e-3, rtol=0)
    # two source cells share one descriptor: only the first keeps a mutual match
    src2 = src.clone()
    src2[0, :, 0, 1] = src2[0, :, 0, 0]
    filt = dense_match(src2, src, "nn", mutual=True)
    assert filt["mutual"][0, :2].tolist() == [True, False] and filt["scores"][0, 1].item() == 0.0


# ---------------------------------------------------------------------------- loss
def ref_pair_loss(s_maps, gts, T=0.04, size=7, sigma=1.5):
    """DESIGN.md 3 for one pair in plain Python: s_maps (N, h, w), gts [(x, y)]."""
    total = 0.0
    r = size // 2
    for s, (gx, gy) in zip(s_maps, gts):
        s = np.asarray(s, dtype=np.float64)
        h, w = s.shape
        e = np.exp((s - s.max()) / T)
        p = e / e.sum()
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                x, y = gx + dx, gy + dy
                if not (0 < x < w - 1 and 0 < y < h - 1):
                    continue
                k = math.exp(-(dx * dx + dy * dy) / (2 * sigma**2)) / (2 * math.pi * sigma**2)
                total -= k * math.log(ref_bilinear(p, x, y))
    return total / len(gts)


def test_loss_weights_sum_as_the_official_unnormalised_pdf():
    k = [math.exp(-(dx * dx + dy * dy) / (2 * 1.5**2)) / (2 * math.pi * 1.5**2) for dx in range(-3, 4) for dy in range(-3, 4)]
    assert sum(k) == pytest.approx(0.965, abs=0.001)


def test_loss_by_hand_window_cut_by_the_border_and_mean_over_pairs():
    g = torch.Generator().manual_seed(0)
    h, w = 6, 7
    corr = torch.rand(2, 3, h, w, generator=g) * 2 - 1
    gt = torch.tensor([[[1.3, 0.6], [5.5, 4.2], [3.0, 3.0]], [[0.2, 5.0], [2.7, 2.1], [9.0, 9.0]]])
    valid = torch.tensor([[True, True, True], [True, True, False]])  # pair 2 has 2 keypoints
    loss = gaussian_window_ce(corr, gt, valid, temperature=0.04)
    want = (ref_pair_loss(corr[0].numpy(), gt[0].tolist()) + ref_pair_loss(corr[1, :2].numpy(), gt[1, :2].tolist())) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # a point whose whole window lies outside the open box adds nothing but still counts
    far = gaussian_window_ce(corr[:1, :1], torch.tensor([[[-10.0, -10.0]]]))
    assert far.item() == 0.0


def test_loss_gradient_flows_and_no_valid_point_gives_zero():
    corr = torch.randn(1, 2, 5, 5, requires_grad=True)
    loss = gaussian_window_ce(corr, torch.tensor([[[2.2, 2.7], [1.1, 1.1]]]))
    loss.backward()
    assert corr.grad.abs().sum() > 0
    zero = gaussian_window_ce(corr, torch.zeros(1, 2, 2) + 2, torch.zeros(1, 2, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad


def test_a_pair_without_keypoints_leaves_the_mean_over_pairs():
    """The batch loss is the mean over the pairs that have a keypoint: a pair with none (all
    padding) neither adds to it nor counts in its denominator."""
    corr = torch.rand(3, 2, 6, 7, generator=torch.Generator().manual_seed(1)) * 2 - 1
    gt = torch.tensor([[[1.3, 2.6], [4.5, 3.2]], [[2.0, 2.0], [3.0, 1.0]], [[3.2, 4.1], [2.2, 2.2]]])
    valid = torch.tensor([[True, True], [False, False], [True, False]])
    got = gaussian_window_ce(corr, gt, valid).item()
    want = (ref_pair_loss(corr[0].numpy(), gt[0].tolist()) + ref_pair_loss(corr[2, :1].numpy(), gt[2, :1].tolist())) / 2
    assert got == pytest.approx(want, rel=1e-5)


def test_dot_similarity_matches_raw_dot_products():
    """ENABLE_L2_NORM = False (the official dift / fuseDino configs): s is the raw dot product.
    Query (1, 0); target cell (0, 0) holds (1, 0) (cosine 1, dot 1), cell (2, 1) holds (3, 3)
    (cosine 0.707, dot 3): cosine picks (0, 0), dot picks (2, 1)."""
    from sd4match.matching import match, point_correlation

    src = torch.zeros(1, 2, 2, 3)
    src[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    trg = torch.full((1, 2, 2, 3), 0.01)
    trg[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    trg[0, :, 1, 2] = torch.tensor([3.0, 3.0])
    q = torch.tensor([[[0.0, 0.0]]])
    corr = point_correlation(src, trg, q, "dot")
    assert corr[0, 0, 1, 2].item() == pytest.approx(3.0) and corr[0, 0, 0, 0].item() == pytest.approx(1.0)
    assert match(src, trg, q, "nn")["cells"][0, 0].tolist() == [0.0, 0.0]
    assert match(src, trg, q, "nn", similarity="dot")["cells"][0, 0].tolist() == [2.0, 1.0]
    assert match(src, trg, q, "nn", similarity="dot")["scores"][0, 0].item() == pytest.approx(3.0)
    # softargmax on dot products: p = softmax(s / T) over the raw products, by hand
    s = (trg[0].reshape(2, -1).T @ torch.tensor([1.0, 0.0]))  # (6,) dot of the query with each cell
    p = torch.softmax(s / 0.5, 0)
    xs, ys = torch.arange(6) % 3, torch.arange(6) // 3
    want = [(p * xs).sum().item(), (p * ys).sum().item()]
    got = match(src, trg, q, "softargmax", similarity="dot", temperature=0.5)["cells"][0, 0].tolist()
    assert got == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="similarity"):
        point_correlation(src, trg, q, "l1")
