"""The paper's task: the one-hidden-layer MLP of Sohl-Dickstein 2024, one lane a pixel."""
