"""Caption files for ``mcm data pack``: ``.json``, ``.jsonl`` or ``.tsv``/``.txt``, keyed by image stem."""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")

STEM_FIELDS = ("file_name", "stem", "key", "file")  # file_name: the metadata.jsonl of HF imagefolder datasets
TEXT_FIELDS = ("caption", "text")


def _caption_stem(name: str) -> str:
    """``imgs/a.png`` -> ``a``; a plain stem (even with dots, ``a.b``) stays as it is."""
    name = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    base, dot, ext = name.rpartition(".")
    return base if dot and f".{ext.lower()}" in IMAGE_EXTS else name


def _caption_rows(path: Path) -> list[tuple[int, str, str]]:
    """(line number, stem, caption) rows of a captions file; the format follows the extension."""
    ext, text = path.suffix.lower(), path.read_text(encoding="utf-8")
    if ext == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--captions {path}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
            raise ValueError(f"--captions {path}: expected one JSON object {{stem: caption}} with string captions")
        return [(0, k, v) for k, v in obj.items()]
    if ext in (".tsv", ".txt"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            stem, tab, cap = line.partition("\t")
            if line.strip() and (not tab or not stem.strip()):
                raise ValueError(f"--captions {path}: line {n}: expected 'stem<TAB>caption', got {line[:60]!r}")
            if line.strip():
                rows.append((n, stem, cap))
        return rows[1:] if rows and rows[0][1].strip().lower() in STEM_FIELDS else rows
    if ext == ".jsonl":
        return [_jsonl_row(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    raise ValueError(f"--captions {path}: unknown extension {ext!r}; expected .json, .jsonl, .tsv or .txt")


def _jsonl_row(path: Path, n: int, line: str) -> tuple[int, str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"--captions {path}: line {n}: not JSON ({e})") from None
    obj = obj if isinstance(obj, dict) else {}
    stem = next((obj[k] for k in STEM_FIELDS if isinstance(obj.get(k), str)), None)
    cap = next((obj[k] for k in TEXT_FIELDS if isinstance(obj.get(k), str)), None)
    if stem is None or cap is None:
        raise ValueError(f"--captions {path}: line {n}: expected an object with one of {STEM_FIELDS} "
                         f"and one of {TEXT_FIELDS} as strings")
    return n, stem, cap


def load_captions(path: Path) -> dict[str, str]:
    """Captions by image stem.  Formats, by extension:

    - ``.json``: one object ``{"stem": "caption", ...}``
    - ``.jsonl``: one object per line with ``stem``/``key``/``file`` and ``caption``/``text``
    - ``.tsv`` or ``.txt``: ``stem<TAB>caption`` per line (the caption may hold further tabs)
    A header row (``stem``/``key``/``file`` first) is skipped; a file name (``a.png``) counts as its stem.
    """
    if not path.is_file():
        raise FileNotFoundError(f"--captions: {str(path)!r} is not a file")
    captions: dict[str, str] = {}
    for n, name, cap in _caption_rows(path):
        stem = _caption_stem(name)
        if stem in captions:
            log.warning("--captions %s: %s%r has two captions; keeping the last", path.name,
                        f"line {n}: " if n else "", stem)
        captions[stem] = cap.strip()
    return captions


