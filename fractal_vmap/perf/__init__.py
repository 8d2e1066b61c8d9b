"""Performance: the bench command and its timing, the memory plan, and the GPU projection."""
