from .base import AbstractRecurrenceSolver as AbstractRecurrenceSolver
from .fixed_point import Jacobi as Jacobi, Picard as Picard
from .newton import (
    AbstractNewton as AbstractNewton,
    BlockQuasiDEER as BlockQuasiDEER,
    DEER as DEER,
    Newton as Newton,
    QuasiDEER as QuasiDEER,
)
from .sequential import Sequential as Sequential
