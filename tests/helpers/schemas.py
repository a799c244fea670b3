"""JSON schemas for structured-output tests: bounded everywhere (string lengths, enums,
integer ranges), so even the tiny built-in model closes the object well inside max_tokens."""

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "mood": {"enum": ["happy", "sad", "angry"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "mood", "age"],
    "additionalProperties": False,
}
