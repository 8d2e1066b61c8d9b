"""fractal-vmap: map the trainability boundary of nanochat fine-tuning."""
