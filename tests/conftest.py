"""Suite-wide reporting: which items of the API spec's conformance checklist
(../shared/spec/ollama-api.md, section 0) the tests that ran have shown to hold. A test covers item N
when its name starts with `test_checklist_NN` (several items: `test_checklist_07_08_...`)."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

CHECKLIST_ITEMS = range(1, 26)
_NAME = re.compile(r"test_checklist_((?:\d\d_)+)")


@pytest.fixture(autouse=True)
def _no_inherited_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a fresh shell would: setup_logging() writes the level it resolved into the
    environment for child processes, and a level left there by an earlier test would win over the
    flags and OLLAMA_DEBUG of the next one's subprocesses."""
    from tp_ollama.logs import LEVEL_ENV

    monkeypatch.delenv(LEVEL_ENV, raising=False)


def checklist_items(test_name: str) -> list[int]:
    match = _NAME.match(test_name)
    return [int(n) for n in match.group(1).strip("_").split("_")] if match else []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    passed: dict[int, list[str]] = defaultdict(list)
    failed: set[int] = set()
    for outcome in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") != "call" and outcome == "passed":
                continue
            name = report.nodeid.rsplit("::", 1)[-1]
            for item in checklist_items(name):
                if outcome == "passed":
                    passed[item].append(report.nodeid)
                else:
                    failed.add(item)
    if not passed and not failed:
        return
    held = sorted(set(passed) - failed)
    missing = [i for i in CHECKLIST_ITEMS if i not in held]
    terminalreporter.write_sep("-", "Ollama API conformance checklist")
    terminalreporter.write_line(f"items shown to hold ({len(held)}/{len(CHECKLIST_ITEMS)}): {held}")
    if missing:
        terminalreporter.write_line(f"items not shown in this run: {missing}")
