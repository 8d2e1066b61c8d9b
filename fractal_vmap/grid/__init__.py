"""The grid: the one pipeline every task's grid runs through, its run dir and lock, workers, refinement and zooms."""
