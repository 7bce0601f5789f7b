"""Normalising the descriptions and captions that reach the text encoder (the service and the CLI alike)."""

from __future__ import annotations

import unicodedata

# The control characters that count as whitespace (collapsed to a space): tab, line feed, vertical tab, form
# feed, carriage return and next line. Any other (category Cc) is refused.
WHITESPACE_CONTROLS = frozenset("\t\n\v\f\r\x85")


def clean_text(v: str) -> str:
    """Trimmed, runs of whitespace (tabs, newlines included) collapsed to one space; no other control
    characters, and at least one character that is neither a space nor an invisible format character
    (a lone zero-width space or byte-order mark is blank to a reader, not a description)."""
    if not isinstance(v, str):
        raise TypeError(f"must be a string, got {type(v).__name__}")
    # Checked before the whitespace is collapsed: str.split() also splits at the information separators
    # U+001C..U+001F, control characters that would otherwise pass as spaces.
    bad = next((ch for ch in v if unicodedata.category(ch) == "Cc" and ch not in WHITESPACE_CONTROLS), None)
    v = " ".join(v.split())
    if not v:
        raise ValueError("must not be empty or blank")
    if bad is not None:
        raise ValueError(f"must not contain control characters (found U+{ord(bad):04X})")
    # A lone surrogate: bytes that were not UTF-8 (a shell argument read with surrogateescape). The API
    # refuses them while parsing; written into a file's metadata they make it unreadable.
    bad = next((ch for ch in v if unicodedata.category(ch) == "Cs"), None)
    if bad is not None:
        raise ValueError(f"must be valid UTF-8 text (found the undecodable U+{ord(bad):04X})")
    if all(ch == " " or unicodedata.category(ch) == "Cf" for ch in v):
        raise ValueError("must contain a visible character (only spaces and invisible format characters found)")
    return v


def clean_description(v: str) -> str:
    """:func:`clean_text` for a task description, its refusal naming it (``sglora generate``/``select``,
    :meth:`sglora.artifacts.Artifacts.lora_file`)."""
    try:
        return clean_text(v)
    except ValueError as e:
        raise ValueError(f"description {e}") from None
    except TypeError as e:
        raise TypeError(f"description {e}") from None
