"""ControllerConfig.from_env: where the port comes from, and the connection limits' checks."""

from __future__ import annotations

import pytest

from sllm.controller import ControllerConfig

BASE = {"SLLM_INTERNAL_TOKEN": "t", "SLLM_DATABASE_URL": "sqlite:///x.db"}


@pytest.mark.parametrize(
    ("env", "flag", "port"),
    [
        ({}, None, 8700),
        ({"PORT": "8080"}, None, 8080),
        ({"PORT": "8080", "SLLM_PORT": "9000"}, None, 9000),
        ({"PORT": "8080", "SLLM_PORT": "9000"}, 9100, 9100),
        ({"PORT": "8080"}, 9100, 9100),
    ],
    ids=["default", "knative-port", "sllm-port-wins", "flag-wins", "flag-wins-over-port"],
)
def test_port_precedence(env: dict[str, str], flag: int | None, port: int) -> None:
    assert ControllerConfig.from_env({**BASE, **env}, port=flag).port == port


def test_bad_knative_port_names_the_variable() -> None:
    with pytest.raises(ValueError, match="PORT"):
        ControllerConfig.from_env({**BASE, "PORT": "http"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLLM_HEADER_TIMEOUT": "0"}, "header_timeout must be positive"),
        ({"SLLM_BODY_TIMEOUT": "-1"}, "body_timeout must be positive"),
        ({"SLLM_MAX_CONNECTIONS": "8", "SLLM_THREADS": "32"}, "max_connections must exceed"),
        ({"SLLM_MAX_HEADER": "100"}, "max_header_bytes must be at least 1024"),
    ],
    ids=["header-timeout", "body-timeout", "connections", "header-bytes"],
)
def test_connection_limits_are_checked(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ControllerConfig.from_env({**BASE, **env})


def test_connection_limits_from_env() -> None:
    config = ControllerConfig.from_env(
        {
            **BASE,
            "SLLM_HEADER_TIMEOUT": "5",
            "SLLM_BODY_TIMEOUT": "30",
            "SLLM_MAX_CONNECTIONS": "200",
            "SLLM_MAX_HEADER": "32KiB",
        }
    )
    assert (config.header_timeout, config.body_timeout) == (5.0, 30.0)
    assert (config.max_connections, config.max_header_bytes) == (200, 32 * 1024)


def test_resume_settings_from_env_and_checked() -> None:
    default = ControllerConfig.from_env(BASE)
    assert (default.resume_attempts, default.stall_timeout) == (3, 20.0)
    config = ControllerConfig.from_env(
        {**BASE, "SLLM_RESUME_ATTEMPTS": "0", "SLLM_STALL_TIMEOUT": "2.5"}
    )
    assert (config.resume_attempts, config.stall_timeout) == (0, 2.5)  # 0: never resume
    with pytest.raises(ValueError, match="resume_attempts must be at least 0"):
        ControllerConfig.from_env({**BASE, "SLLM_RESUME_ATTEMPTS": "-1"})
    with pytest.raises(ValueError, match="stall_timeout must be positive"):
        ControllerConfig.from_env({**BASE, "SLLM_STALL_TIMEOUT": "0"})


def test_migration_rounds_from_env_and_checked() -> None:
    default = ControllerConfig.from_env(BASE)
    assert (default.migration_threshold, default.migration_max_rounds) == (4, 4)
    config = ControllerConfig.from_env(
        {**BASE, "SLLM_MIGRATION_THRESHOLD": "8", "SLLM_MIGRATION_MAX_ROUNDS": "0"}
    )
    assert (config.migration_threshold, config.migration_max_rounds) == (8, 0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLLM_MIGRATION_THRESHOLD": "0"}, r"migration_threshold must be in \[1, 4096\].*got 0"),
        ({"SLLM_MIGRATION_MAX_ROUNDS": "-1"}, r"migration_max_rounds must be in \[0, 64\]"),
        ({"SLLM_MIGRATION_MAX_ROUNDS": "65"}, r"migration_max_rounds .*got 65"),
        ({"SLLM_MIGRATION_THRESHOLD": "four"}, "SLLM_MIGRATION_THRESHOLD: expected a number"),
    ],
    ids=["threshold-0", "rounds-negative", "rounds-too-many", "threshold-not-a-number"],
)
def test_bad_migration_rounds_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ControllerConfig.from_env({**BASE, **env})
