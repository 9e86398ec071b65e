"""Dataset formats and sources: CSV, Parquet, file:// inside a root, s3:// on a local S3 server."""

from __future__ import annotations

import io
import json
from importlib import resources
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

RECORDS = [json.loads(line) for line in (resources.files("service.data") / "sample.jsonl").read_text().splitlines()]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def parquet_bytes(records: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buffer)
    return buffer.getvalue()


def test_csv_upload_and_a_bad_row(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    good = 'text,label\nhello there,a\n"quoted, with comma",b\n'
    response = api.post(
        "/v1/datasets", headers=auth(tenant_key), files={"file": ("d.csv", good)}, data={"label_field": "label"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["num_records"] == 2 and response.json()["format"] == "csv"
    bad = "text,label\nok,a\ntoo,many,fields\n"
    response = api.post("/v1/datasets", headers=auth(tenant_key), files={"file": ("d.csv", bad)})
    assert response.status_code == 422 and "row 3 has more fields" in response.json()["error"]["message"]


def test_parquet_upload_counts_entities(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    response = api.post(
        "/v1/datasets",
        headers=auth(tenant_key),
        files={"file": ("d.parquet", parquet_bytes(RECORDS))},
        data={"entity_column": "user_id"},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "parquet" and body["num_records"] == len(RECORDS)
    assert body["num_entities"] == len({r["user_id"] for r in RECORDS})
    broken = api.post("/v1/datasets", headers=auth(tenant_key), files={"file": ("d.parquet", b"not parquet")})
    assert broken.status_code == 422 and "Parquet" in broken.json()["error"]["message"]


def test_file_uri_inside_the_root_only(api, tenant_key: str, api_env: dict) -> None:  # type: ignore[no-untyped-def]
    root = Path(api_env["DPFT_DATASET_FILE_ROOT"])
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS[:10]))
    ok = api.post("/v1/datasets", headers=auth(tenant_key), data={"uri": f"file://{root}/train.jsonl"})
    assert ok.status_code == 201, ok.text and ok.json()["num_records"] == 10
    outside = root.parent / "secret.jsonl"
    outside.write_text('{"text": "x"}\n')
    for uri in (f"file://{outside}", f"file://{root}/../secret.jsonl", "file:///etc/passwd"):
        refused = api.post("/v1/datasets", headers=auth(tenant_key), data={"uri": uri})
        assert refused.status_code == 422, uri
        assert refused.json()["error"]["param"] == "uri"
    both = api.post(
        "/v1/datasets",
        headers=auth(tenant_key),
        data={"uri": "s3://b/k.jsonl"},
        files={"file": ("d.jsonl", b'{"text": "x"}')},
    )
    assert both.status_code == 422
    assert api.post("/v1/datasets", headers=auth(tenant_key), data={"uri": "ftp://x/y.jsonl"}).status_code == 422


def test_s3_uri_on_a_local_s3_server(api, tenant_key: str, s3_endpoint: str) -> None:  # type: ignore[no-untyped-def]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="private-data")
    s3.put_object(Bucket="private-data", Key="tickets/train.parquet", Body=parquet_bytes(RECORDS))
    response = api.post(
        "/v1/datasets", headers=auth(tenant_key), data={"uri": "s3://private-data/tickets/train.parquet"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["num_records"] == len(RECORDS) and response.json()["name"] == "train.parquet"
    missing = api.post("/v1/datasets", headers=auth(tenant_key), data={"uri": "s3://private-data/nope.jsonl"})
    assert missing.status_code == 422 and "No object" in missing.json()["error"]["message"]
