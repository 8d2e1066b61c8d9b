"""Run dirs in, files out: labels, the boundary's dimension, tables, pictures, comparisons. No torch."""
