"""`python -m fractal_vmap <command>` (and `torchrun -m fractal_vmap grid ...`): the same as the `fractal-vmap`
script."""

from fractal_vmap.cli import main

main()
