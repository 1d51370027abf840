"""The Diffrax versions the bridge supports.

The bridge uses a few Diffrax internals (see `step.py` and `solve.py`), so it is
pinned to the range it is tested with, as `pyproject.toml` pins it, and refuses any
other version on import instead of failing in some call later.
"""

import importlib.metadata
import re


# At least `MINIMUM`, below `BELOW` (release numbers, compared as tuples).
MINIMUM = (0, 7, 2)
BELOW = (0, 8)
# As a requirement specifier, as in `pyproject.toml`.
SUPPORTED = f">={'.'.join(map(str, MINIMUM))},<{'.'.join(map(str, BELOW))}"


def installed_version() -> str:
    """The version of the installed Diffrax distribution."""
    return importlib.metadata.version("diffrax")


def _release(version: str) -> tuple[int, ...]:
    """The release numbers at the start of a version string: `"0.7.2.dev1"` gives
    `(0, 7, 2)`."""
    match = re.match(r"\d+(\.\d+)*", version)
    if match is None:
        return ()
    return tuple(int(part) for part in match.group(0).split("."))


def check_diffrax_version() -> None:
    """Raises an `ImportError` unless the installed Diffrax is a supported version."""
    version = installed_version()
    release = _release(version)
    if not (release and MINIMUM <= release < BELOW):
        raise ImportError(
            f"parallel_dynamics supports diffrax{SUPPORTED}, the versions it is tested "
            f"with, but diffrax {version} is installed. Install a supported version, "
            f"e.g. `pip install 'diffrax{SUPPORTED}'`."
        )
