"""`fractal-vmap study`: the grids that answer whether a model's trainability boundary is fractal and which learning
rate is safe for a token budget, run (plan.py, run.py) and read (twins.py, rules.py, report.py). A layer above grid/:
every grid goes through grid.pipeline.run_grid, each in its own run dir inside the study dir, so a rerun resumes."""
