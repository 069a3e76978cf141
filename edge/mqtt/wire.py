"""How payloads look on the wire: compact UTF-8 JSON that is always valid."""

from __future__ import annotations

import json
from typing import Any


def _default(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars from the pipeline
    return item() if callable(item) else str(value)


def dumps(obj: Any) -> bytes:
    # backslashreplace turns a lone surrogate into its JSON escape, so the output stays valid.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                      default=_default).encode("utf-8", "backslashreplace")
