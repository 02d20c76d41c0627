"""tp_ollama.server.fields: a JSON field checked against its kind, absent or null giving the default, and the
message naming the field, the kinds it may be and what it was (a boolean is not a number)."""

from __future__ import annotations

import pytest

from tp_ollama.server.fields import ApiError, json_field, json_kind


def test_json_kinds_are_named_as_json_names_them():
    values = [None, True, 3, 1.5, "s", [1], {"a": 1}, (1,)]
    assert [json_kind(v) for v in values] == [
        "null",
        "boolean",
        "number",
        "number",
        "string",
        "array",
        "object",
        "tuple",
    ]


def test_a_field_of_its_kind_is_returned_and_absent_or_null_gives_the_default():
    body = {"n": 3, "x": 1.5, "flag": False, "none": None}
    assert json_field(body, "n", int) == 3
    assert json_field(body, "x", (int, float)) == 1.5
    assert json_field(body, "flag", bool, True) is False
    assert json_field(body, "none", str, "d") == "d" and json_field(body, "absent", str) is None


@pytest.mark.parametrize(
    ("value", "kind", "message"),
    [
        ("3", int, "field 'f' must be number, got string"),
        (True, int, "field 'f' must be number, got boolean"),
        ([1], (int, float), "field 'f' must be number, got array"),
        (1, (str, list), "field 'f' must be string or array, got number"),
    ],
)
def test_a_field_of_another_kind_is_400_naming_both(value: object, kind: type | tuple[type, ...], message: str):
    with pytest.raises(ApiError) as e:
        json_field({"f": value}, "f", kind)
    assert (e.value.status, e.value.message) == (400, message)
