import jax
import pytest


# The suite runs in float64 by default so that solvers can be compared with the
# sequential reference to tight tolerances; float32 tests build float32 arrays
# explicitly (which also exercises dtype preservation under x64).
jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops JAX's compiled programs after each test module. Every XLA:CPU executable
    keeps memory mappings of its own, and a process may hold at most
    `vm.max_map_count` of them (65530 by default): the whole suite in one process
    exceeded that, and XLA then crashed while compiling (segmentation fault or abort
    in `backend_compile_and_load`). Modules share their compiled functions within
    themselves, rarely across modules."""
    yield
    jax.clear_caches()
