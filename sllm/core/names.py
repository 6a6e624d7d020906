"""The names clients choose: namespaces and functions (DNS labels), published models, key ids.

Every check is a full match: `re.match` with `$` also accepts a trailing newline
("fa\\n"), which then reaches the database, URLs and object keys.
"""

from __future__ import annotations

import re

# Knative routes {fn}.{ns}.{domain}, so namespaces and functions are DNS labels.
DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
DNS_LABEL_RULE = (
    "a DNS label: 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
)
MODEL_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?")
MODEL_NAME_RULE = (
    "1-128 characters of letters, digits, '.', '_' and '-', starting and ending with a "
    "letter or digit, without '..'"
)

# Generated key ids are 16 hex digits; keys given at server start may have others (OpenWhisk's
# are UUIDs). Printable ASCII without ':' keeps NUL and control characters out of queries.
KEY_ID = re.compile(r"[!-9;-~]{1,32}")
KEY_ID_RULE = "1-32 printable ASCII characters other than ':'"


def is_api_key(value: object) -> bool:
    """Whether `value` is a well-formed API key: KEY_ID:SECRET, the KEY_ID as `KEY_ID_RULE`."""
    if not isinstance(value, str):
        return False
    key_id, sep, secret = value.partition(":")
    return bool(sep and secret) and KEY_ID.fullmatch(key_id) is not None


def is_dns_label(value: object) -> bool:
    """Whether `value` is a string that is a DNS label."""
    return isinstance(value, str) and DNS_LABEL.fullmatch(value) is not None


def is_model_name(value: object) -> bool:
    """Whether `value` is a string that is a valid published model name."""
    return isinstance(value, str) and MODEL_NAME.fullmatch(value) is not None and ".." not in value
