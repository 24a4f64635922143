"""Hyperparameter study on FGVC-Aircraft (torchvision's layout under --data-root, variant
level): every method's own knobs searched with Ray Tune + Optuna, the best evaluated on test.

    python studies/aircraft_sweep.py --data-root /data/aircraft --preset paper
    (--synthetic uses the embedded CUB-layout dataset instead)
"""

import sys

from fgray.tune.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main(prog="aircraft_sweep.py", description=__doc__,
                        dataset="aircraft"))
