"""The API reference documents every public name, and nothing that is neither one
nor a name of `pdyn.internal`.

Fast: reads the Markdown of `docs/api/`, never builds the site (`mkdocs build --strict`
in `.ci/run` does that).
"""

import pathlib
import re
import types

import parallel_dynamics as pdyn


API_DIR = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api"
DIRECTIVE = re.compile(r"^:::\s+parallel_dynamics\.([A-Za-z_][A-Za-z0-9_.]*)\s*$", re.M)


def public_names() -> set[str]:
    names = set(getattr(pdyn, "__all__", ()))
    names |= {
        name
        for name in dir(pdyn)
        if not name.startswith("_")
        and not isinstance(getattr(pdyn, name), types.ModuleType)
    }
    return names


def documented_names() -> dict[str, pathlib.Path]:
    documented = {}
    for page in sorted(API_DIR.glob("*.md")):
        for match in DIRECTIVE.finditer(page.read_text(encoding="utf-8")):
            documented[match.group(1)] = page
    return documented


def test_the_api_reference_exists():
    assert API_DIR.is_dir()
    assert documented_names(), f"no `::: parallel_dynamics.<name>` entries in {API_DIR}"


def test_every_public_name_is_in_the_api_reference():
    missing = sorted(public_names() - set(documented_names()))
    assert not missing, (
        "Public names without an entry in the API reference: add "
        + ", ".join(f"`::: parallel_dynamics.{name}`" for name in missing)
        + f" to a page of {API_DIR} (and its nav entry in mkdocs.yml if new)."
    )


def _exists(name: str, public: set[str]) -> bool:
    """A public name, a member of one, or a name of `pdyn.internal`."""
    head, _, rest = name.partition(".")
    if head == "internal":
        return bool(rest) and hasattr(pdyn.internal, rest.split(".")[0])
    return head in public


def test_the_api_reference_documents_only_public_names():
    public = public_names()
    stale = {
        name: page.name
        for name, page in documented_names().items()
        if not _exists(name, public)
    }
    assert not stale, f"Documented but not public in `parallel_dynamics`: {stale}"


def test_every_api_page_is_in_the_nav():
    config = (API_DIR.parents[1] / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [
        page.name for page in API_DIR.glob("*.md") if f"api/{page.name}" not in config
    ]
    assert not missing, f"API pages missing from the nav of mkdocs.yml: {missing}"
