"""Every item of the API spec's conformance checklist has at least one test named after it."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import CHECKLIST_ITEMS, checklist_items


def test_every_checklist_item_has_a_test_named_after_it():
    covered: dict[int, list[str]] = {}
    for path in Path(__file__).parent.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                for item in checklist_items(node.name):
                    covered.setdefault(item, []).append(f"{path.name}::{node.name}")
    missing = [i for i in CHECKLIST_ITEMS if i not in covered]
    assert not missing, f"checklist items without a test: {missing}"
    assert set(covered) <= set(CHECKLIST_ITEMS), f"tests name items the checklist does not have: {sorted(covered)}"


def test_names_map_to_items():
    assert checklist_items("test_checklist_07_08_empty_prompt_loads") == [7, 8]
    assert checklist_items("test_checklist_19_embed") == [19]
    assert checklist_items("test_embed") == []
