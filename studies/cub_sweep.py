"""Hyperparameter study on CUB-200-2011: every method's own knobs searched with Ray Tune +
Optuna (TPE, ASHA), the best configuration of each method evaluated once on test.

    python studies/cub_sweep.py --synthetic --preset smoke            # laptop, minutes
    python studies/cub_sweep.py --data-root /data/CUB_200_2011 --preset paper \\
        --storage s3://bucket/studies                                 # GPU cluster
    ray job submit --working-dir . -- python studies/cub_sweep.py --data-root ... --preset paper
"""

import sys

from fgray.tune.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main(prog="cub_sweep.py", description=__doc__,
                        dataset="cub"))
