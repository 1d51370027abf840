"""Levenberg–Marquardt on a trajectory (ELK), composed of: the damping and its
acceptance rule (`damping.py`), the trust region in time (`time_window.py`), the linear
step on the window (`linear_step.py`), the gain ratio (`gain_ratio.py`) and the
stopping test (`stopping.py`), put together in `solver.py`."""

from .damping import (
    AbstractDamping as AbstractDamping,
    AdaptiveDamping as AdaptiveDamping,
    FixedDamping as FixedDamping,
    NonmonotoneDamping as NonmonotoneDamping,
)
from .solver import (
    AbstractLevenbergMarquardt as AbstractLevenbergMarquardt,
    ELK as ELK,
    LevenbergMarquardt as LevenbergMarquardt,
    QuasiELK as QuasiELK,
)
from .time_window import TimeWindow as TimeWindow
