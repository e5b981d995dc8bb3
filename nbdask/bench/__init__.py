"""The paper's benchmark (``nbdask bench``) and the same diagnostics for a user's own design
(``nbdask calibrate``).

- ``generator``: the one generator of count cubes with truth (the paper's settings, or a design
  fitted from a cube);
- ``methods``: the roster of estimators and options, read from nbdask itself, and statsmodels;
- ``metrics``: accuracy, rejection rates with SEs, KS distance, power at matched FPR, FDP;
- ``study``: accuracy, calibration, power and speed; ``report`` and ``plots`` write them;
- ``calibrate``: fit a cube's design, simulate it, judge every setting, recommend one.

Nothing here is imported by ``nbdask.test``; pandas (with xarray) is required, matplotlib and
statsmodels are optional (``pip install 'nbdask[bench]'``).
"""

STUDIES = ("accuracy", "calibration", "power", "speed")
