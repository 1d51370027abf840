"""The tables of `docs/benchmarks.md`: every function renders the results in
`benchmarks/results/` as Markdown whose table rows have as many cells as their
header, and says so when a results file is missing."""

import pytest

from benchmarks import tables


FUNCTIONS = [
    tables.targets,
    tables.floor,
    tables.full_grid,
    tables.memory_runs,
    tables.gradients,
    tables.profile,
    tables.gpu_grid,
    tables.gpu_scans,
    tables.elk,
    tables.ode,
    tables.sharding,
] + [
    lambda section=section: tables.quick(section)
    for section in ("grid", "passes", "scans", "convergence", "memory")
]


def _check_tables(text: str):
    columns = None
    for line in text.split("\n"):
        line = line.strip()
        if not line.startswith("|"):
            columns = None
            continue
        cells = line.count("|") - 1
        if columns is None:
            columns = cells
        assert cells == columns, line


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_every_table_renders(fn):
    text = fn()
    assert isinstance(text, str) and text
    _check_tables(text)


def test_a_missing_results_file_is_said(monkeypatch, tmp_path):
    monkeypatch.setattr(tables, "RESULTS_DIR", tmp_path)
    assert "missing" in tables.elk()
    assert "No quick run" in tables.quick("grid")
