from .base import AbstractRecurrenceSolver as AbstractRecurrenceSolver
from .fixed_point import Jacobi as Jacobi, Picard as Picard
from .levenberg_marquardt import (
    AbstractDamping as AbstractDamping,
    AbstractLevenbergMarquardt as AbstractLevenbergMarquardt,
    AdaptiveDamping as AdaptiveDamping,
    ELK as ELK,
    FixedDamping as FixedDamping,
    LevenbergMarquardt as LevenbergMarquardt,
    NonmonotoneDamping as NonmonotoneDamping,
    QuasiELK as QuasiELK,
    TimeWindow as TimeWindow,
)
from .newton import (
    AbstractNewton as AbstractNewton,
    BlockQuasiDEER as BlockQuasiDEER,
    DEER as DEER,
    Newton as Newton,
    QuasiDEER as QuasiDEER,
)
from .sequential import Sequential as Sequential
from .trust_region_newton import (
    AbstractTrustRegionNewton as AbstractTrustRegionNewton,
    QuasiTrustDEER as QuasiTrustDEER,
    TrustDEER as TrustDEER,
    TrustRegionNewton as TrustRegionNewton,
)
