"""Torch-free analysis of run dirs: the boundary's dimension, calibrated on boundaries whose dimension is known."""
