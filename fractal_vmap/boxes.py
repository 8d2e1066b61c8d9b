"""Where to zoom: the square boxes of a measure grid that hold the most boundary (edge pixels).

A box is (row0, row1, col0, col1): the cells rows row0..row1-1 and cols col0..col1-1 of the grid (half-open, as in
slicing). Its edge count is the number of edge pixels (fractal.edge_pixels: 2x2 blocks of cells that hold both
phases) lying wholly inside it, so a box of s x s cells holds at most (s-1)^2 of them.
Boxes are picked greedily: the box with the most edge pixels anywhere on the grid, then the best one that shares no
cell with it, and so on. Ties go to the box nearest the top-left (lowest row0, then col0).
"""

from dataclasses import dataclass

import numpy as np

from fractal_vmap.fractal import edge_pixels


@dataclass(frozen=True)
class Box:
    row0: int
    row1: int
    col0: int
    col1: int
    edges: int  # edge pixels inside the box

    @property
    def density(self) -> float:
        """Edge pixels per 2x2 block inside the box (1.0: every block straddles the boundary)."""
        return self.edges / max((self.row1 - self.row0 - 1) * (self.col1 - self.col0 - 1), 1)


def box_edge_counts(edges: np.ndarray, size: int) -> np.ndarray:
    """counts[r, c] = edge pixels inside the box of size x size cells whose first cell is (r, c):
    edge pixels (r..r+size-2, c..c+size-2). edges: bool [H-1, W-1]; returns int [H-size+1, W-size+1]."""
    assert size >= 2, f"a box needs at least 2 cells a side to hold an edge pixel, got {size}"
    e = np.asarray(edges, dtype=np.int64)
    k = size - 1  # a box of `size` cells spans size - 1 edge pixels per side
    table = np.zeros((e.shape[0] + 1, e.shape[1] + 1), dtype=np.int64)  # summed-area table with a zero border
    table[1:, 1:] = e.cumsum(0).cumsum(1)
    return table[k:, k:] - table[:-k, k:] - table[k:, :-k] + table[:-k, :-k]


def boundary_boxes(measure: np.ndarray, size: int, k: int = 1) -> list[Box]:
    """Up to k non-overlapping size x size boxes of a [H, W] measure grid with the most edge pixels, best first.
    Fewer come back when no box with at least one edge pixel is left."""
    m = np.asarray(measure, dtype=np.float64)
    assert m.ndim == 2, f"measure must be 2-D, got shape {m.shape}"
    H, W = m.shape
    assert 2 <= size <= min(H, W), f"box size must be in 2..{min(H, W)}, got {size}"
    counts = box_edge_counts(edge_pixels(m), size)
    free = np.ones_like(counts, dtype=bool)  # boxes that share no cell with one already picked
    boxes = []
    for _ in range(k):
        masked = np.where(free, counts, -1)
        r, c = np.unravel_index(int(np.argmax(masked)), masked.shape)  # argmax: the first maximum in row-major order
        if masked[r, c] <= 0:
            break
        boxes.append(Box(int(r), int(r) + size, int(c), int(c) + size, int(counts[r, c])))
        # a box starting at (r', c') overlaps this one when |r' - r| < size and |c' - c| < size
        free[max(0, r - size + 1) : r + size, max(0, c - size + 1) : c + size] = False
    return boxes


def box_values(box: Box, row_values, col_values) -> tuple[float, float, float, float]:
    """The axis values of a box's first and last cells: (row_min, row_max, col_min, col_max), for a zoomed grid."""
    rows, cols = np.asarray(row_values, dtype=np.float64), np.asarray(col_values, dtype=np.float64)
    return float(rows[box.row0]), float(rows[box.row1 - 1]), float(cols[box.col0]), float(cols[box.col1 - 1])
