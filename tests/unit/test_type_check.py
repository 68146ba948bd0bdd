"""`mypy common` passes (started beside the tests by tests/conftest.py; tests/type_check.py)."""

from tests import type_check


def test_mypy_passes_over_common() -> None:
    code, report = type_check.result()
    assert code == 0, f"{' '.join(type_check.COMMAND[1:])} failed (exit {code}):\n{report[-6000:]}"
    assert "Success: no issues found" in report, report[-2000:]
