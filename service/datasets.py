"""Dataset ingestion: stream an upload to the store, validating every record on the way.

A dataset that fails validation is stored nowhere: the file is written to a temporary name and
only renamed into place once every record has passed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from service.errors import InvalidRequest, PayloadTooLarge

FORMATS = ("jsonl", "csv")
CHUNK = 1 << 20


class DatasetInvalid(InvalidRequest):
    code = "invalid_dataset"


@dataclass
class DatasetSummary:
    num_records: int = 0
    columns: list[str] = field(default_factory=list)
    entities: set[str] = field(default_factory=set)
    size_bytes: int = 0
    content_hash: str = ""

    @property
    def num_entities(self) -> int:
        return len(self.entities)


def guess_format(filename: str | None, declared: str | None) -> str:
    if declared:
        fmt = declared.lower()
    else:
        suffix = Path(filename or "").suffix.lower().lstrip(".")
        fmt = {"json": "jsonl", "ndjson": "jsonl", "jsonl": "jsonl", "csv": "csv"}.get(suffix, "")
    if fmt not in FORMATS:
        raise InvalidRequest(
            f"Unsupported dataset format {fmt or filename!r}: use one of {', '.join(FORMATS)} "
            "(set `format`, or name the file with that extension).",
            param="format",
        )
    return fmt


def copy_limited(source: BinaryIO, target: BinaryIO, max_bytes: int) -> tuple[int, str]:
    """Copy in chunks, refusing more than max_bytes; returns (size, sha256)."""
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(
                f"The upload exceeds the limit of {max_bytes} bytes (DPFT_MAX_UPLOAD_BYTES)."
            )
        digest.update(chunk)
        target.write(chunk)
    return size, digest.hexdigest()


def iter_records(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line or row number, record); raises DatasetInvalid with the position of a bad one."""
    with path.open("rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
        try:
            if fmt == "jsonl":
                for number, line in enumerate(text, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DatasetInvalid(
                            f"Line {number} is not valid JSON: {exc.msg}.", param="file"
                        ) from None
                    if not isinstance(record, dict):
                        raise DatasetInvalid(f"Line {number} is not a JSON object.", param="file")
                    yield number, record
            else:
                reader = csv.DictReader(text)
                for number, row in enumerate(reader, start=2):
                    if None in row:
                        raise DatasetInvalid(f"Row {number} has more fields than the header.", param="file")
                    yield number, dict(row)
        except UnicodeDecodeError as exc:
            raise DatasetInvalid(
                f"The file is not UTF-8 text (bad byte at offset {exc.start} of a chunk); re-encode it as UTF-8.",
                param="file",
            ) from None


def validate_records(
    path: Path,
    fmt: str,
    *,
    text_field: str,
    label_field: str | None,
    entity_column: str | None,
    max_record_chars: int,
) -> DatasetSummary:
    summary = DatasetSummary()
    columns: dict[str, None] = {}
    for number, record in iter_records(path, fmt):
        where = f"line {number}" if fmt == "jsonl" else f"row {number}"
        text = record.get(text_field)
        if not isinstance(text, str) or not text.strip():
            raise DatasetInvalid(
                f"The record at {where} has no non-empty string field {text_field!r} "
                "(set `text_field` to the column that holds the text).",
                param="text_field",
            )
        if len(text) > max_record_chars:
            raise DatasetInvalid(
                f"The record at {where} has {len(text)} characters in {text_field!r}, "
                f"more than the limit of {max_record_chars} (DPFT_MAX_RECORD_CHARS).",
                param="file",
            )
        if label_field is not None and record.get(label_field) in (None, ""):
            raise DatasetInvalid(
                f"The record at {where} has no label in {label_field!r}.", param="label_field"
            )
        if entity_column is not None:
            entity = record.get(entity_column)
            if entity in (None, ""):
                raise DatasetInvalid(
                    f"The record at {where} has no entity id in {entity_column!r}.", param="entity_column"
                )
            summary.entities.add(str(entity))
        columns.update(dict.fromkeys(record))
        summary.num_records += 1
    if summary.num_records == 0:
        raise DatasetInvalid("The dataset has no records.", param="file")
    summary.columns = list(columns)
    return summary


def load_records(path: Path, fmt: str) -> list[dict[str, Any]]:
    return [record for _, record in iter_records(path, fmt)]
