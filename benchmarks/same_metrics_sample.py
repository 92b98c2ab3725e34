"""Train the refactor check's sample of tiny styledigits runs into OUT, for `same_metrics.py`.

    # with the code before the change on PYTHONPATH (e.g. `git archive BASE | tar -x -C /tmp/base`):
    DOMADAPT_BIN_KERNEL=torch PYTHONPATH=/tmp/base python benchmarks/same_metrics_sample.py /tmp/sm
    # then with the code after it (PYTHONPATH: a script's folder, not the checkout, is on sys.path):
    DOMADAPT_BIN_KERNEL=torch PYTHONPATH=. python benchmarks/same_metrics.py /tmp/sm/*

The sample: source-only and DANN, each with BN and BIN (digitnet, color -> gray, 30
iterations, evaluations capped at 200 images), CPU. Run it once with DOMADAPT_BIN_KERNEL=torch
(the torch BIN path) and once without (the C kernels).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import domadapt
from domadapt.config import RunConfig
from domadapt.train import run


def main(out: Path) -> None:
    print(f"code: {domadapt.__file__}; DOMADAPT_BIN_KERNEL={os.environ.get('DOMADAPT_BIN_KERNEL')}")
    for method in ("source-only", "dann"):
        for norm in ("bn", "bin"):
            cfg = RunConfig(dataset="styledigits", source="color", target="gray", method=method,
                            norm=norm, backbone="digitnet", pretrained="none", iters=30,
                            batch_size=16, image_size=28, resize_size=32, eval_every=15,
                            checkpoint_every=15, num_workers=0, seed=0, eval_max_images=200)
            run(cfg, out / f"{method}_{norm}", device="cpu", quiet=True)
            print("trained", out / f"{method}_{norm}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: same_metrics_sample.py OUT")
    main(Path(sys.argv[1]))
