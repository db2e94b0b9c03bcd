"""JSON schemas of the answers, and the check every answer passes before use.

An answer that is not JSON, or not of its question's shape, raises
`MalformedAnswer`; the runner asks again, then skips the question and counts it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

from imfree.errors import ImfreeError

_STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}}

SENTENCES = {
    "type": "object",
    "properties": {"sentences": {**_STRINGS, "minItems": 1}},
    "required": ["sentences"],
}
PHOTOS = {
    "type": "object",
    "properties": {
        "photos": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "classes": {**_STRINGS, "minItems": 1, "maxItems": 5},
                    "sentence": {"type": "string", "minLength": 1},
                },
                "required": ["classes", "sentence"],
            },
        }
    },
    "required": ["photos"],
}
GROUPS = {
    "type": "object",
    "properties": {
        "fine": {"type": "object", "minProperties": 1, "additionalProperties": _STRINGS},
        "coarse": {"type": "object", "minProperties": 1, "additionalProperties": _STRINGS},
    },
    "required": ["fine", "coarse"],
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "appearance": SENTENCES,
    "context": SENTENCES,
    "cooccurrence": PHOTOS,
    "grouping": GROUPS,
}

# Models often wrap JSON in a Markdown fence even when told not to.
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


class MalformedAnswer(ImfreeError):
    """An answer that is not JSON of the expected shape."""


def parse_answer(kind: str, text: str) -> dict[str, Any]:
    """The answer's JSON object, checked against its kind's schema."""
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MalformedAnswer(f"{kind} answer is not JSON ({err.msg})") from err
    try:
        jsonschema.validate(data, SCHEMAS[kind])
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "top level"
        raise MalformedAnswer(f"{kind} answer does not fit its schema at {where}: "
                              f"{err.message[:120]}") from err
    return data
