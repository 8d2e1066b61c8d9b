"""Boundary boxes: the densest boxes of a synthetic image whose boundary is known, against a brute-force count."""

import numpy as np
import pytest

from fractal_vmap.boxes import Box, box_edge_counts, box_values, boundary_boxes
from fractal_vmap.fractal import edge_pixels


def synthetic(H=64, W=80):
    """A straight vertical boundary (trained left of col 50) plus a checkerboard patch, the densest boundary there
    can be, at rows 8..23, cols 12..27 inside the trained half."""
    m = np.where(np.arange(W)[None, :] < 50, -1.0, 1.0) * np.ones((H, 1))
    rows, cols = np.mgrid[8:24, 12:28]
    m[8:24, 12:28] = np.where((rows + cols) % 2 == 0, -1.0, 1.0)
    return m


def brute_count(measure, r0, r1, c0, c1):
    return int(edge_pixels(measure[r0:r1, c0:c1]).sum())


def test_counts_match_brute_force_on_random_signs():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((23, 31))
    for size in (2, 5, 23):
        counts = box_edge_counts(edge_pixels(m), size)
        assert counts.shape == (23 - size + 1, 31 - size + 1)
        for r in range(0, counts.shape[0], 3):
            for c in range(0, counts.shape[1], 4):
                assert counts[r, c] == brute_count(m, r, r + size, c, c + size)


def overlaps(a, b) -> bool:
    return not (a.row1 <= b.row0 or b.row1 <= a.row0 or a.col1 <= b.col0 or b.col1 <= a.col0)


def test_the_checkerboard_comes_first():
    m = synthetic()
    first = boundary_boxes(m, size=16, k=1)[0]
    assert first.edges == 15 * 15 and first.density == 1.0  # every 2x2 block inside it holds both phases
    # only boxes on the patch (give or take the one-cell rim, whose blocks touch the patch too) can hold that many
    assert 7 <= first.row0 <= 9 and 11 <= first.col0 <= 13
    assert (first.row1 - first.row0, first.col1 - first.col0) == (16, 16)


def test_greedy_picks_the_best_free_box_each_time():
    m = synthetic()
    size = 16
    boxes = boundary_boxes(m, size=size, k=6)
    picked = []
    for b in boxes:
        assert b.edges == brute_count(m, b.row0, b.row1, b.col0, b.col1)
        # brute force: the best count over every box position sharing no cell with the boxes picked before it
        best = max(
            brute_count(m, r, r + size, c, c + size)
            for r in range(0, 64 - size + 1)
            for c in range(0, 80 - size + 1)
            if not any(overlaps(Box(r, r + size, c, c + size, 0), p) for p in picked)
        )
        assert b.edges == best
        picked.append(b)
    assert [b.edges for b in boxes] == sorted((b.edges for b in boxes), reverse=True)
    assert boxes[-1].edges == 15  # by then only boxes across the straight line (one edge pixel per row) are left


def test_boxes_never_overlap_and_stop_when_no_boundary_is_left():
    m = synthetic()
    boxes = boundary_boxes(m, size=16, k=100)
    assert all(not overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert all(b.edges > 0 for b in boxes) and len(boxes) < 100
    counts = box_edge_counts(edge_pixels(m), 16)  # every box with boundary left out overlaps a picked one
    for r, c in zip(*np.nonzero(counts)):
        assert any(overlaps(Box(r, r + 16, c, c + 16, 0), b) for b in boxes)
    assert boundary_boxes(-np.ones((20, 20)), size=4, k=3) == []  # one phase: no boundary, no box


def test_nan_cells_are_not_boundary():
    m = synthetic()
    m[:, 40:] = np.nan  # the straight line is not computed yet: only the patch and its rim are boundary
    boxes = boundary_boxes(m, size=16, k=10)
    assert boxes[0].edges == 225
    assert all(b.col1 <= 40 and overlaps(b, Box(7, 25, 11, 29, 0)) for b in boxes)


def test_box_values_and_bad_size():
    rows, cols = np.logspace(-3, 6, 64), np.linspace(0, 1, 80)
    assert box_values(Box(8, 24, 12, 28, 1), rows, cols) == (rows[8], rows[23], cols[12], cols[27])
    with pytest.raises(AssertionError):
        boundary_boxes(synthetic(), size=1)
