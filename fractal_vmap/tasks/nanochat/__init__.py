"""The nanochat SFT task: rows of fine-tuning lanes of a nanochat model on the lane engine."""
