"""A finished grid as arrays, for every grid (a row-by-row grid, a refined map, a zoom): the trained cells' results as
columns (runs.Table) and, for every cell of the [H, W] map, which trained result it shows (`source`: itself, or a
refined map's coarse parent). This is what lets a 4097^2 map (16.8M cells, 247K trained) finish in a few GB: a cell
that no level trained costs 4 bytes of `source` and a byte of each per-cell column (`trained`, `level`), not a dict.

cells.parquet is built from it block by block (CHUNK_CELLS cells at a time, zstd: a filled block repeats its
parent's values, which zstd keeps small), and a field laid out [H, W] (`field`) is one fancy index.
"""

from dataclasses import dataclass, field

import numpy as np

from fractal_vmap.analysis.runs import Table, table_of
from fractal_vmap.axes import Axis

CHUNK_CELLS = 1 << 20  # cells of cells.parquet built and written at once (about 200 MB of frame at the peak)
# cells.parquet's columns after row, col and both axes; threads and device: the row's (runs.row_lanes)
CELL_COLUMNS = [
    "row",
    "col",
    "stable",
    "converged",
    "trainable_ratio",
    "final_loss",
    "avg_loss",
    "measure",
    "trainable_loss0",
    "trainable_mean_last_k",
    "tokens_seen",
    "steps",
    "total_steps",
    "learning_rate",
    "matrix_lr",
    "embedding_lr",
    "unembedding_lr",
    "num_tokens_target",
    "seed",
    "error",
    "threads",
    "device",
]
LR_COLUMNS = ("learning_rate", "matrix_lr", "embedding_lr", "unembedding_lr")
DTYPES = {**{c: "float64" for c in LR_COLUMNS}, "threads": "Int64", "device": "string"}


@dataclass
class CellMap:
    """table: the trained cells' columns (grid_i, grid_j, labels, ...), n entries; source: int [H, W], the entry each
    cell shows (-1: no result); extra: per-cell columns [H, W] of a refined map (trained, level)."""

    table: Table
    source: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.source.shape

    def field(self, name: str) -> np.ndarray:
        """A column laid out [H, W] as float64 (NaN where no cell has a result)."""
        out = np.asarray(self.table[name], dtype=np.float64)[self.source]
        out[self.source < 0] = np.nan
        return out

    def trainable_fraction(self) -> float:
        """The fraction of the cells with a result that trained (a refined map's filled cells counted as shown)."""
        return float(np.asarray(self.table["converged"], dtype=bool)[self.source[self.source >= 0]].mean())

    def frame(self, r0: int, r1: int, row: Axis, col: Axis, lrs: list[list[dict]] | None = None):
        """cells.parquet's rows for the map's rows r0..r1: the cells with a result, row-major."""
        import pandas as pd

        W = self.shape[1]
        src = self.source[r0:r1].ravel()
        keep = src >= 0
        ii, jj = np.repeat(np.arange(r0, r1), W)[keep], np.tile(np.arange(W), r1 - r0)[keep]
        src = src[keep]
        # an axis named like a field (seed) once: the axis value wins, then the cell's learning rates, then its result
        data = {"row": ii, "col": jj, row.name: np.asarray(row.values)[ii], col.name: np.asarray(col.values)[jj]}
        if lrs:
            cell_lrs = [lrs[i][j] for i, j in zip(ii.tolist(), jj.tolist())]
            for key in dict.fromkeys(k for d in cell_lrs for k in d):
                data.setdefault(key, np.array([d.get(key) for d in cell_lrs], dtype=object))
        for key, values in self.extra.items():
            data.setdefault(key, values[r0:r1].ravel()[keep])
        for key, values in self.table.items():
            if key not in data and values.ndim == 1:
                data[key] = values[src]
        columns = list(dict.fromkeys(["row", "col", row.name, col.name, *CELL_COLUMNS, *self.extra]))
        return pd.DataFrame(data).reindex(columns=columns).astype(DTYPES)


def from_lanes(lanes: list[dict], H: int, W: int) -> CellMap:
    """A grid's lanes (one dict a cell: a row-by-row grid's) as a map; a refined grid's own `trained` and `level`
    fields become its per-cell columns."""
    table = table_of(lanes) if lanes else {"grid_i": np.zeros(0, np.int64), "grid_j": np.zeros(0, np.int64)}
    table.pop("losses", None)  # cells.parquet holds no curve
    source = np.full((H, W), -1, dtype=np.int64)
    source[table["grid_i"], table["grid_j"]] = np.arange(len(table["grid_i"]))
    extra = {}
    for key in ("trained", "level"):
        if key in table:
            extra[key] = table.pop(key)[source]
    return CellMap(table, source, extra)


def parquet_bytes(cells: CellMap, row: Axis, col: Axis, lrs: list[list[dict]] | None = None) -> bytes:
    """cells.parquet's bytes, built block by block in memory (70 MB for a 4097^2 paper map): one row a cell with a
    result (CellMap.frame). The caller writes them with files.write_atomic, whose full-disk handling a file that
    pyarrow wrote itself would miss."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    H, W = cells.shape
    block = max(1, CHUNK_CELLS // max(W, 1))
    first = pa.Table.from_pandas(cells.frame(0, min(H, block), row, col, lrs), preserve_index=False)
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, first.schema, compression="zstd") as writer:
        writer.write_table(first)
        for r0 in range(block, H, block):
            frame = cells.frame(r0, min(H, r0 + block), row, col, lrs)
            writer.write_table(pa.Table.from_pandas(frame, schema=first.schema, preserve_index=False))
    return sink.getvalue().to_pybytes()
