"""Files written whole or not at all: a reader, a resumed run or a crash sees the old file or the new one, never
a part of either."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(target: str | Path, write: Callable[[str], object]) -> None:
    """`write(tmp)` into a temporary file beside `target`, then renamed onto it: `target` is whole or untouched."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomically(target: str | Path, text: str) -> None:
    """`target` holds `text` (UTF-8), written by `write_atomically`."""
    write_atomically(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomically(target: str | Path, value: Any, indent: int = 2) -> None:
    """`target` holds `value` as JSON (UTF-8, a final newline), written by `write_atomically`."""
    write_text_atomically(target, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")
