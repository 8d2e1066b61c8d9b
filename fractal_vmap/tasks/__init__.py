"""What a grid's cells train: one entry a task (nanochat SFT fine-tuning, the paper's MLP)."""
