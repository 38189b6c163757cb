"""What the studies share: worker set-up and the t table of their intervals.

The studies in this folder are research runs (several seeds, several settings, minutes to hours on
two cores) that write ``experiments/results/``; the performance benchmarks live in ``benchmarks/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
# two-sided 95% Student t quantiles by degrees of freedom (n - 1 paired seeds)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def quiet() -> None:
    """Workers print nothing (progress bars of two runs interleave); errors reach the driver as exceptions."""
    import warnings

    warnings.filterwarnings("ignore")
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (for the worker's lifetime)
