"""The one reader layer for user text files: UTF-8 text, JSONL records, CSV/TSV rows.

Every fault of a file the user gave (missing, unreadable, a non-UTF-8 byte, invalid JSON, JSON
nested too deeply to decode, a CSV quoted field that is never closed, a row with more fields
than the header) raises ONE exception of the caller's ``UserError`` class, whose message starts
with ``path:line`` and says what the file was expected to hold. No raw ``UnicodeDecodeError``,
``RecursionError`` or ``csv.Error`` escapes. File contents are never put in a message (prompts
are sensitive): only positions, byte values, column names and counts.

CSV/TSV are parsed strictly: a quote that opens a field must close it right before a delimiter
or the end of the line, so an unclosed quote is reported on the line where the quoted field
started instead of silently merging the following rows into one field. A UTF-8 byte-order mark
before the header is ignored (spreadsheet exports write one).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any, Iterator, Optional, Sequence

from advgame_jax.errors import UserError

BOM = "\ufeff"


class ReaderError(UserError, ValueError):
    """A user file is not in the form its reader expects (default class of this module)."""


def _open(path: str, kind: str, error: type[UserError]):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise error(f"{path}: cannot be read: file not found; expected {kind}") from None
    except IsADirectoryError:
        raise error(f"{path}: cannot be read: it is a directory; expected {kind}") from None
    except OSError as err:
        raise error(f"{path}: cannot be read ({err.strerror}); expected {kind}") from None


def _decode_line(raw: bytes, where: str, kind: str, error: type[UserError]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(
            f"{where}: byte {raw[err.start]:#04x} at column {err.start + 1} is not "
            f"UTF-8; expected {kind} in UTF-8"
        ) from None


def decode_utf8(data: bytes, path: str, kind: str, error: type[UserError] = ReaderError) -> str:
    """``data`` (a whole file) as text; a non-UTF-8 byte is reported as ``path:line``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise error(
            f"{path}:{line}: byte {data[err.start]:#04x} at column {column} is not "
            f"UTF-8; expected {kind} in UTF-8"
        ) from None
    return text[1:] if text.startswith(BOM) else text


def read_text(path: str | os.PathLike, kind: str, error: type[UserError] = ReaderError) -> str:
    """A whole UTF-8 text file (``kind`` names what it should be, for the messages)."""
    path = os.fspath(path)
    with _open(path, kind, error) as f:
        data = f.read()
    return decode_utf8(data, path, kind, error)


def loads_json(text: str, where: str, expected: str, error: type[UserError] = ReaderError):
    """``json.loads`` whose every failure is one ``error`` naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(
            f"{where}: not valid JSON (invalid JSON syntax: {err.msg}, column "
            f"{err.colno}); {expected}"
        ) from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to decode; {expected}") from None


def jsonl_records(
    path: str | os.PathLike,
    expected: str,
    error: type[UserError] = ReaderError,
    *,
    objects_only: bool = True,
) -> Iterator[tuple[int, Any]]:
    """``(line number, decoded record)`` for every non-blank line of a JSONL file.

    ``expected`` (e.g. ``'expected a JSON object {"prompt": ...}'``) ends every message.
    ``objects_only``: a line that decodes to anything but a JSON object is an error.
    """
    path = os.fspath(path)
    kind = "a JSONL file"
    with _open(path, kind, error) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            text = _decode_line(raw, where, kind, error)
            if lineno == 1 and text.startswith(BOM):
                text = text[1:]
            if not text.strip():
                continue
            record = loads_json(text, where, expected, error)
            if objects_only and not isinstance(record, dict):
                raise error(f"{where}: got a JSON {type(record).__name__}; {expected}")
            yield lineno, record


def _quote_start(lines: Sequence[str], first_line: int, delimiter: str) -> int:
    """Line (1-based, the first of ``lines`` being ``first_line``) where the last quoted field
    of this row opened: the field a strict CSV parse failed on."""
    opened = first_line
    in_quotes, at_field_start, pending_close = False, True, False
    for offset, text in enumerate(lines):
        for ch in text:
            if in_quotes:
                if pending_close:
                    pending_close = False
                    if ch == '"':  # a doubled quote: a literal quote, still inside
                        continue
                    in_quotes = False  # the quote closed the field; re-read ch outside
                elif ch == '"':
                    pending_close = True
                    continue
                else:
                    continue
            if ch == '"' and at_field_start:
                in_quotes, opened, at_field_start = True, first_line + offset, False
                continue
            at_field_start = ch in (delimiter, "\n", "\r")
    return opened


def table_rows(
    path: str | os.PathLike,
    required: Sequence[str],
    *,
    delimiter: str = ",",
    kind: Optional[str] = None,
    error: type[UserError] = ReaderError,
    exact_width: bool = False,
) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number where the row starts, {column: cell})`` for every non-blank row of a
    CSV (``delimiter=","``) or TSV (``"\\t"``) file with a header line holding ``required``.

    A row shorter than the header lacks the trailing columns (``row.get`` gives None) unless
    ``exact_width``, where it is an error; a longer row is always an error.
    """
    path = os.fspath(path)
    kind = kind or ("a TSV file" if delimiter == "\t" else "a CSV file")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with _open(path, kind, error) as f:
        table = _Table(f, path, kind, error, delimiter)
        header = table.header(required)
        while True:
            start, row = table.next_row()
            if row is None:
                return
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) > len(header):
                raise error(
                    f"{path}:{start}: more fields ({len(row)}) than the header's "
                    f"{len(header)} columns; expected {kind} with one cell per column"
                )
            if exact_width and len(row) != len(header):
                raise error(
                    f"{path}:{start}: row has {len(row)} fields; expected {len(header)} "
                    "(as in the header)"
                )
            # A short row (allowed unless exact_width) leaves its trailing columns out.
            yield start, dict(zip(header, row, strict=False))


class _Table:
    """Strict ``csv.reader`` rows of an open file, each with the line it starts on; a parse
    error becomes one ``error`` naming the line (for an unclosed quote, where it opened)."""

    def __init__(self, f, path: str, kind: str, error: type[UserError], delimiter: str):
        self.path, self.kind, self.error, self.delimiter = path, kind, error, delimiter
        self.consumed: list[str] = []  # physical lines of the row being parsed
        self.reader = csv.reader(self._physical(f), delimiter=delimiter, strict=True)

    def _physical(self, f):
        for lineno, raw in enumerate(f, start=1):
            text = _decode_line(raw, f"{self.path}:{lineno}", self.kind, self.error)
            if lineno == 1 and text.startswith(BOM):
                text = text[1:]
            self.consumed.append(text)
            yield text

    def next_row(self) -> tuple[int, Optional[list[str]]]:
        start = self.reader.line_num + 1
        self.consumed.clear()
        try:
            return start, next(self.reader)
        except StopIteration:
            return start, None
        except csv.Error as err:
            raise self._parse_error(str(err), start) from None

    def _parse_error(self, msg: str, start: int) -> UserError:
        path, kind, line_num = self.path, self.kind, self.reader.line_num
        if "expected after" in msg or "unexpected end of data" in msg:
            line = _quote_start(self.consumed, start, self.delimiter)
            end = (
                "the end of the file"
                if "end of data" in msg
                else f"line {line_num}, where a closing quote is followed by more text"
            )
            return self.error(
                f"{path}:{line}: the quoted field that starts on this line is not "
                f"closed before {end}; expected {kind} where a quoted field ends "
                f"with a quote right before the delimiter or the line end (a "
                f'quote inside it is written twice: "")'
            )
        return self.error(f"{path}:{line_num}: unreadable row ({msg}); expected {kind}")

    def header(self, required: Sequence[str]) -> list[str]:
        """The stripped header cells, which must hold every ``required`` column."""
        _, header = self.next_row()
        if header is None:
            raise self.error(
                f"{self.path}: empty file; expected {self.kind} whose header holds the columns "
                f"{list(required)}"
            )
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise self.error(
                f"{self.path}:1: header lacks column(s) {missing}; expected {self.kind} whose "
                f"header holds at least {list(required)}, got {header}"
            )
        return header
