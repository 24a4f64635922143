"""Hyperparameter study on Stanford Cars (torchvision's layout under --data-root): every
method's own knobs searched with Ray Tune + Optuna, the best of each evaluated on test.

    python studies/cars_sweep.py --data-root /data/cars --preset paper
    (--synthetic uses the embedded CUB-layout dataset instead)
"""

import sys

from fgray.tune.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main(prog="cars_sweep.py", description=__doc__,
                        dataset="cars"))
