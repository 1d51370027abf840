import jax


# The suite runs in float64 by default so that solvers can be compared with the
# sequential reference to tight tolerances; float32 tests build float32 arrays
# explicitly (which also exercises dtype preservation under x64).
jax.config.update("jax_enable_x64", True)
