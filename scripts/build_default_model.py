"""Build (or rebuild) the embedded default model into $FRACTAL_STORAGE_DIR: `uv run python
scripts/build_default_model.py`.

The `grid` and `finetune` commands build it on first use anyway; this is for building it ahead of time.
"""

import shutil
import time

from fractal_vmap.default_model import VERSION, build_default_model, storage_dir

if __name__ == "__main__":
    directory = storage_dir() / f"default-model-v{VERSION}"
    if directory.exists():
        shutil.rmtree(directory)
    t0 = time.perf_counter()
    build_default_model(directory)
    print(f"built {directory} in {time.perf_counter() - t0:.1f} s")
