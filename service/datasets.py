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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from service.errors import InvalidRequest, PayloadTooLarge

FORMATS = ("jsonl", "csv", "parquet")
PARQUET_BATCH_ROWS = 1024
MAX_PROBLEMS = 20
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
        fmt = {
            "json": "jsonl",
            "ndjson": "jsonl",
            "jsonl": "jsonl",
            "csv": "csv",
            "parquet": "parquet",
            "pq": "parquet",
        }.get(suffix, "")
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
            raise PayloadTooLarge(f"The upload exceeds the limit of {max_bytes} bytes (DPFT_MAX_UPLOAD_BYTES).")
        digest.update(chunk)
        target.write(chunk)
    return size, digest.hexdigest()


Row = tuple[int, dict[str, Any] | None, str | None]  # (line or row number, record, problem)


def iter_parquet(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        number = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                number += 1
                yield number, record, None
    except (pa.ArrowException, OSError) as exc:
        raise DatasetInvalid(f"The file is not readable as Parquet: {exc}.", param="file") from None


def iter_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as raw:
        for number, line in enumerate(raw, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, f"line {number} is not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8"
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, None, f"line {number} is not valid JSON: {exc.msg} (column {exc.colno})"
                continue
            if isinstance(record, dict):
                yield number, record, None
            else:
                yield number, None, f"line {number} is not a JSON object"


def iter_csv(path: Path) -> Iterator[Row]:
    with path.open("rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
        try:
            for number, row in enumerate(csv.DictReader(text), start=2):
                if None in row:
                    yield number, None, f"row {number} has more fields than the header"
                else:
                    yield number, dict(row), None
        except UnicodeDecodeError as exc:
            yield -1, None, f"the file is not UTF-8 text (byte {exc.start} of a block); re-encode it as UTF-8"
        except csv.Error as exc:
            yield -1, None, f"the CSV is malformed: {exc}"


def iter_records(path: Path, fmt: str) -> Iterator[Row]:
    """Yield every record with its line or row number, or the problem that made it unreadable."""
    readers = {"jsonl": iter_jsonl, "csv": iter_csv, "parquet": iter_parquet}
    yield from readers[fmt](path)


def validate_records(
    path: Path,
    fmt: str,
    *,
    text_field: str,
    label_field: str | None,
    entity_column: str | None,
    max_record_chars: int,
) -> DatasetSummary:
    """Check every record; raise one DatasetInvalid that reports the problems found (up to
    MAX_PROBLEMS, each with its line or row), so a user can fix the file in one go."""
    summary = DatasetSummary()
    columns: dict[str, None] = {}
    problems: list[tuple[str, str]] = []  # (problem, the request field it concerns)
    for number, record, problem in iter_records(path, fmt):
        if len(problems) >= MAX_PROBLEMS:
            break
        if problem is not None or record is None:
            problems.append((problem or "unreadable record", "file"))
            continue
        where = f"line {number}" if fmt == "jsonl" else f"row {number}"
        text = record.get(text_field)
        if not isinstance(text, str) or not text.strip():
            problems.append((f"{where} has no non-empty string field {text_field!r}", "text_field"))
        elif len(text) > max_record_chars:
            problems.append(
                (
                    f"{where} has {len(text)} characters in {text_field!r}, over DPFT_MAX_RECORD_CHARS={max_record_chars}",
                    "file",
                )
            )
        if label_field is not None and record.get(label_field) in (None, ""):
            problems.append((f"{where} has no label in {label_field!r}", "label_field"))
        if entity_column is not None:
            entity = record.get(entity_column)
            if entity in (None, ""):
                problems.append((f"{where} has no entity id in {entity_column!r}", "entity_column"))
            else:
                summary.entities.add(str(entity))
        columns.update(dict.fromkeys(record))
        summary.num_records += 1
    if problems:
        listed = "; ".join(problem for problem, _ in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DatasetInvalid(
            f"The dataset was not stored: {listed}{more}. Fix the file, or name the right fields "
            "(text_field, label_field, entity_column), and upload it again.",
            param=problems[0][1],
            details=[problem for problem, _ in problems],
        )
    if summary.num_records == 0:
        raise DatasetInvalid("The dataset has no records.", param="file")
    summary.columns = list(columns)
    return summary


def load_records(path: Path, fmt: str) -> list[dict[str, Any]]:
    """The records of a dataset that passed validation."""
    return [record for _, record, _ in iter_records(path, fmt) if record is not None]


def check_uri(uri: str, *, file_root: Path | None) -> None:
    """Refuse a URI dpft may not read, before anything is fetched."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        if not parts.netloc or not parts.path.strip("/"):
            raise InvalidRequest("An s3:// URI names a bucket and a key: s3://bucket/path/data.jsonl.", param="uri")
        return
    if parts.scheme != "file":
        raise InvalidRequest(f"Unsupported URI scheme {parts.scheme!r}: use file:// or s3://.", param="uri")
    if file_root is None:
        raise InvalidRequest(
            "file:// URIs are disabled here: the operator must set DPFT_DATASET_FILE_ROOT.", param="uri"
        )
    raw_path = Path(unquote(parts.path))
    if ".." in raw_path.parts:
        raise InvalidRequest("file:// URIs may not contain '..'.", param="uri")
    if not raw_path.resolve().is_relative_to(file_root.resolve()):
        raise InvalidRequest(f"{uri} is outside the directory datasets may be read from.", param="uri")


@contextmanager
def open_uri(uri: str, *, file_root: Path | None, s3_endpoint_url: str | None) -> Iterator[BinaryIO]:
    """Open a dataset named by URI: `file://` inside the configured root, or `s3://` through fsspec."""
    check_uri(uri, file_root=file_root)
    if urlsplit(uri).scheme == "file":
        path = Path(unquote(urlsplit(uri).path)).resolve()
        if not path.is_file():
            raise InvalidRequest(f"No file at {uri}.", param="uri")
        with path.open("rb") as handle:
            yield handle
        return
    import fsspec

    options = {"client_kwargs": {"endpoint_url": s3_endpoint_url}} if s3_endpoint_url else {}
    try:
        handle = fsspec.open(uri, "rb", **options).open()
    except FileNotFoundError:
        raise InvalidRequest(f"No object at {uri}.", param="uri") from None
    except (PermissionError, OSError, ValueError) as exc:
        raise InvalidRequest(f"Cannot read {uri}: {exc}.", param="uri") from None
    try:
        yield handle
    finally:
        handle.close()
