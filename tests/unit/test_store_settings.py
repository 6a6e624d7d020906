"""Store URIs and S3 settings: parsing, defaults and the messages a user sees for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllm.core.errors import InvalidRequest
from sllm.store import LocalStore, StoreSettings, default_store_uri, open_store

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "empty"),
        ("/abs/path", "no scheme"),
        ("ftp://host/x", "unsupported scheme 'ftp'"),
        ("file://relative/path", "file:///path"),
        ("file:///a/../b", "'..'"),
        ("s3://", "not a valid bucket"),
        ("s3://Bad_Bucket", "not a valid bucket"),
        ("s3://ab", "not a valid bucket"),
        ("s3://bucket/a/../b", "invalid key prefix"),
        ("s3://user:pw@bucket", "SLLM_S3_"),
    ],
    ids=[
        "empty",
        "no-scheme",
        "ftp",
        "file-host",
        "file-dotdot",
        "s3-empty",
        "s3-upper",
        "s3-short",
        "s3-dotdot",
        "s3-credentials",
    ],
)
def test_bad_uris_are_rejected_clearly(uri: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")):
        open_store(uri, StoreSettings(endpoint="127.0.0.1:1"))


def test_s3_uri_without_endpoint_names_the_setting() -> None:
    with pytest.raises(InvalidRequest, match="SLLM_S3_ENDPOINT"):
        open_store("s3://models")
    with pytest.raises(InvalidRequest, match="SLLM_S3_ENDPOINT"):
        open_store("s3://models", StoreSettings())


def test_file_uri_opens_a_local_store_and_creates_the_folder(tmp_path: Path) -> None:
    store = open_store((tmp_path / "new" / "store").as_uri())
    assert isinstance(store, LocalStore)
    assert (tmp_path / "new" / "store").is_dir()
    assert open_store(store.uri).uri == store.uri


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLLM_STORE_URI": "s3://b/p", "SLLM_HOME": "/x"}, "s3://b/p"),
        ({"SLLM_HOME": "/srv/sllm"}, "file:///srv/sllm/store"),
        ({"HOME": "/home/u"}, "file:///home/u/.sllm/store"),
    ],
    ids=["explicit", "sllm-home", "home"],
)
def test_default_store_uri(env: dict[str, str], expected: str) -> None:
    assert default_store_uri(env) == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLLM_S3_ENDPOINT": "127.0.0.1:9000"}, StoreSettings(endpoint="127.0.0.1:9000")),
        (
            {"SLLM_S3_ENDPOINT": "minio.svc:9000", "SLLM_S3_REGION": "eu-west-1"},
            StoreSettings(endpoint="minio.svc:9000", secure=True, region="eu-west-1"),
        ),
        (
            {"SLLM_S3_ENDPOINT": "http://minio.svc", "SLLM_S3_SECURE": "false"},
            StoreSettings(endpoint="http://minio.svc"),
        ),
        (
            {
                "SLLM_S3_ENDPOINT": "https://s3.amazonaws.com",
                "SLLM_S3_ACCESS_KEY": "ak",
                "SLLM_S3_SECRET_KEY": "sk",
                "SLLM_S3_PART_SIZE_MB": "16",
            },
            StoreSettings(
                endpoint="https://s3.amazonaws.com",
                access_key="ak",
                secret_key="sk",
                secure=True,
                part_size=16 * MIB,
            ),
        ),
        ({}, StoreSettings()),
    ],
    ids=["loopback", "remote-host", "http-url", "https-keys", "nothing"],
)
def test_settings_from_env(env: dict[str, str], expected: StoreSettings) -> None:
    assert StoreSettings.from_env(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLLM_S3_ENDPOINT": "ftp://x"}, "SLLM_S3_ENDPOINT"),
        ({"SLLM_S3_ENDPOINT": "host:99999"}, "SLLM_S3_ENDPOINT.*port"),
        ({"SLLM_S3_ENDPOINT": "host:\u00b2"}, "SLLM_S3_ENDPOINT.*port"),
        ({"SLLM_S3_ENDPOINT": "http://h/path"}, "SLLM_S3_ENDPOINT.*path"),
        ({"SLLM_S3_ENDPOINT": "h:1", "SLLM_S3_SECURE": "maybe"}, "SLLM_S3_SECURE"),
        ({"SLLM_S3_ENDPOINT": "http://h:1", "SLLM_S3_SECURE": "true"}, "SLLM_S3_SECURE"),
        ({"SLLM_S3_ACCESS_KEY": "ak"}, "SLLM_S3_SECRET_KEY"),
        ({"SLLM_S3_SECRET_KEY": "sk"}, "SLLM_S3_ACCESS_KEY"),
        ({"SLLM_S3_REGION": "Not A Region"}, "SLLM_S3_REGION"),
        ({"SLLM_S3_PART_SIZE_MB": "1"}, "SLLM_S3_PART_SIZE_MB"),
        ({"SLLM_S3_PART_SIZE_MB": "lots"}, "SLLM_S3_PART_SIZE_MB"),
    ],
    ids=[
        "scheme",
        "port",
        "port-superscript-digit",
        "path",
        "secure-word",
        "secure-http",
        "no-secret",
        "no-access",
        "region",
        "part-small",
        "part-word",
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        StoreSettings.from_env(env)
