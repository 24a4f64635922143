"""Every method x seed at a fixed budget with the papers' default settings (no search, no
early stopping), each run evaluated on test: the leaderboard reports mean ± std over seeds.

    python studies/compare_methods.py --synthetic --preset smoke --seeds 2
    python studies/compare_methods.py --data-root /data/CUB_200_2011 --preset paper --seeds 3
"""

import sys

from fgray.tune.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main(prog="compare_methods.py", description=__doc__,
                        dataset="cub", mode="compare"))
