"""Which dataset URIs may be read (`tasks.common.landing`): the webhook receiver and the flow apply the same rules.

The receiver maps a refusal to its HTTP code (422 malformed or too large, 403 outside `webhook.allowed_uris`); a flow
run started with a `dataset` parameter (by the landed event, by hand, or by anyone who can emit the event) gets one
`DatasetRefused` naming the setting and the fix, before anything is read or downloaded.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import fsspec
import pytest

from deployments.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeliveryStore,
    Receiver,
    Rejected,
    check_dataset_uri,
    content_sha256,
    signed_headers,
)
from flows.finetune import use_dataset
from tasks.common.landing import DatasetRefused, admit_dataset, materialize
from tasks.config import ConfigError, load_config

SECRET = "landing-" + "0123456789abcdef" * 2


@pytest.fixture
def landing(tmp_path) -> Path:
    root = tmp_path / "landing"
    (root / "2026").mkdir(parents=True)
    (root / "2026" / "rows.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "secret.jsonl").write_text('{"prompt": "secret", "completion": "x"}\n')
    return root


def test_uri_allow_list_and_traversal(tmp_path, landing):
    data, outside = landing / "2026" / "rows.jsonl", tmp_path / "secret.jsonl"
    sibling = tmp_path / "landing-evil"
    sibling.mkdir()
    (sibling / "rows.jsonl").write_text("{}\n")
    (landing / "escape.jsonl").symlink_to(outside)
    allowed = [str(landing), "s3://bucket/landing/"]

    assert check_dataset_uri(str(data), allowed).local == data.resolve()
    assert check_dataset_uri(data.as_uri(), allowed).local == data.resolve()
    assert check_dataset_uri("s3://bucket/landing/2026/rows.parquet", allowed).local is None

    refused = {
        str(landing / ".." / "secret.jsonl"): 422,
        str(landing) + "/2026/%2e%2e/%2e%2e/secret.jsonl": 422,
        "file://" + str(landing) + "/%2e%2e/secret.jsonl": 422,
        "file://" + str(landing) + "/%252e%252e/secret.jsonl": 422,
        str(landing) + "\\..\\secret.jsonl": 422,
        str(data) + "\x00.txt": 422,
        "landing/2026/rows.jsonl": 422,  # relative
        "file://evil.example.com" + str(data): 422,
        str(outside): 403,
        str(sibling / "rows.jsonl"): 403,  # shares the allowed root's name as a prefix, not its folder
        str(landing / "escape.jsonl"): 403,  # a symlink inside the root pointing outside
        "s3://bucket/landing-evil/rows.jsonl": 403,
        "s3://other/landing/rows.jsonl": 403,
        "gs://bucket/landing/rows.jsonl": 403,
        "s3://bucket/landing/../private/rows.jsonl": 422,
        "s3://bucket/landing/rows.jsonl?versionId=1": 422,
        "s3://user:pw@bucket/landing/rows.jsonl": 422,
        "s3://bucket/landing/x::file:///etc/passwd": 422,  # fsspec chaining would read another filesystem
        "http://bucket/landing/rows.jsonl": 403,
    }
    for uri, status in refused.items():
        with pytest.raises(Rejected) as info:
            check_dataset_uri(uri, allowed)
        assert info.value.status == status, uri


def test_allow_list_entries_must_be_absolute():
    with pytest.raises(ConfigError, match="absolute"):
        load_config(None, ["webhook.allowed_uris=[data/landing]"])
    with pytest.raises(ConfigError, match=r"'\.\.'"):
        load_config(None, ["webhook.allowed_uris=[/data/../etc]"])


def test_receiver_content_and_size_checks(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"a": 1}\n')
    allowed = json.dumps([str(tmp_path), "s3://bucket/landing/"])
    cfg = load_config(None, [f"webhook.allowed_uris={allowed}", "webhook.max_dataset_bytes=1000"])
    r = Receiver(cfg, SECRET, DeliveryStore(tmp_path / "state.sqlite", cfg.webhook.delivery_ttl_s))

    def send(**payload) -> tuple[int, dict]:
        body = json.dumps({"delivery_id": uuid.uuid4().hex, **payload}).encode()
        headers = signed_headers(SECRET, body)
        return r.handle(headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], body)

    assert send(dataset_uri=str(tmp_path / "missing.jsonl"))[0] == 422
    assert send(dataset_uri=str(data), sha256="0" * 64)[0] == 422  # announced hash differs from the bytes on disk
    assert send(dataset_uri="s3://bucket/landing/rows.jsonl")[0] == 422  # object stores need the hash
    (tmp_path / "big.jsonl").write_bytes(b"x" * 1001)
    (tmp_path / "parts").mkdir()
    for name in ("part-0.jsonl", "part-1.jsonl"):
        (tmp_path / "parts" / name).write_bytes(b"x" * 600)
    for uri in (tmp_path / "big.jsonl", tmp_path / "parts"):  # too large: refused before the data is hashed
        code, answer = send(dataset_uri=str(uri))
        assert code == 422 and "over webhook.max_dataset_bytes (1000 bytes)" in answer["detail"], answer
    assert content_sha256(data) == hashlib.sha256(data.read_bytes()).hexdigest()
    assert r.store.counts()["deliveries"] == 0


def test_flow_admits_only_data_inside_the_allow_list(tmp_path, landing):
    data, outside = landing / "2026" / "rows.jsonl", tmp_path / "secret.jsonl"
    allowed, big = [str(landing), "memory://bucket/landing/"], 1 << 20
    assert admit_dataset(str(data), allowed, big).local == data.resolve()
    assert admit_dataset(data.as_uri(), allowed, big).local == data.resolve()
    assert admit_dataset(str(landing / "2026"), allowed, big).local == (landing / "2026").resolve()  # a folder
    (landing / "inner.jsonl").symlink_to(data)  # links that stay inside are fine
    assert admit_dataset(str(landing / "inner.jsonl"), allowed, big).local == data.resolve()
    assert admit_dataset("memory://bucket/landing/rows.jsonl", allowed, big).local is None

    def refused(uri: str, allow: list[str] = allowed, max_bytes: int = big) -> DatasetRefused:
        with pytest.raises(DatasetRefused) as info:
            admit_dataset(uri, allow, max_bytes)
        return info.value

    for uri in (str(outside), outside.as_uri(), "memory://bucket/private/rows.jsonl"):
        err = refused(uri)
        assert err.kind == "outside" and "webhook.allowed_uris" in str(err) and "fix: land the data under" in str(err), uri
    err = refused(str(data), allow=[])
    assert "webhook.allowed_uris is empty" in str(err) and "--set 'webhook.allowed_uris=[" in str(err)
    for uri in (str(landing / ".." / "secret.jsonl"), f"{landing}/%2e%2e/secret.jsonl", f"file://{landing}/%252e%252e/secret.jsonl"):
        err = refused(uri)
        assert err.kind == "malformed" and "'..'" in str(err) and "fix:" in str(err), uri

    (landing / "escape.jsonl").symlink_to(outside)  # a link in the landing folder pointing outside it
    assert refused(str(landing / "escape.jsonl")).kind == "outside"
    folder = landing / "2026-05"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("{}\n")
    (folder / "part-1.jsonl").symlink_to(outside)  # ... or a link inside a dataset folder
    err = refused(str(folder))
    assert err.kind == "outside" and "part-1.jsonl" in str(err) and "fix: copy the data" in str(err)
    (folder / "part-1.jsonl").unlink()
    (folder / "sub").symlink_to(tmp_path)  # a linked folder
    assert refused(str(folder)).kind == "outside"

    err = refused(str(data), max_bytes=10)
    assert err.kind == "too_large" and "over webhook.max_dataset_bytes (10 bytes)" in str(err)
    assert "fix: raise webhook.max_dataset_bytes" in str(err)
    assert refused(str(landing / "2026"), max_bytes=10).kind == "too_large"  # all files of a folder count


def test_use_dataset_refuses_before_reading_anything(tmp_path, landing):
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/private/rows.jsonl", b'{"prompt": "secret", "completion": "x"}\n')
    fs.pipe("/bucket/landing/big.jsonl", b'{"prompt": "a", "completion": "b"}\n' * 100)
    runs = tmp_path / "runs"
    cfg = load_config(None, [f"run.runs_dir={runs}", f"webhook.allowed_uris={json.dumps([str(landing), 'memory://bucket/landing/'])}",
                             "webhook.max_dataset_bytes=1000"])
    train = cfg.data.train
    cases = {
        "memory://bucket/private/rows.jsonl": "outside",  # an object outside the allowed prefixes: never downloaded
        str(tmp_path / "secret.jsonl"): "outside",
        f"{landing}/%2e%2e/secret.jsonl": "malformed",
        "memory://bucket/landing/big.jsonl": "too_large",  # inside, but over the limit: refused before the download
    }
    for uri, kind in cases.items():
        with pytest.raises(DatasetRefused) as info:
            use_dataset(cfg, uri)
        assert info.value.kind == kind, uri
        assert cfg.data.train == train, uri
    assert not any((runs / ".landing").glob("*/*")), "nothing was downloaded"


def test_materialize_checks_object_sizes_before_and_after_download(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/landing/sized.jsonl", b"{}\n" * 10)
    dest = tmp_path / "dest"
    with pytest.raises(DatasetRefused, match="webhook.max_dataset_bytes"):
        materialize("memory://bucket/landing/sized.jsonl", dest, max_bytes=29)
    assert not any(dest.glob("*/*")), "refused before the download"
    local = materialize("memory://bucket/landing/sized.jsonl", dest, max_bytes=30)
    assert Path(local).read_bytes() == b"{}\n" * 10
