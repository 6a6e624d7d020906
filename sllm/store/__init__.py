"""The object store: where published checkpoints live (S3-compatible or a local folder).

open_store(uri, settings)        "file:///path" -> LocalStore, "s3://bucket/prefix" -> S3Store
default_store_uri(env)           SLLM_STORE_URI, else file://$SLLM_HOME/store
StoreSettings.from_env(env)      S3 endpoint and credentials from SLLM_S3_*
push_model(src, name, store)     convert if needed, upload, then flip models/{name}/published.json
read_published(store, name)      the live version of a model
list_models(store)               every published model
"""

from ._base import ObjectInfo, ShortObject, Store
from ._local import LocalStore
from ._published import (
    PublishedFile,
    PublishedModel,
    list_models,
    read_published,
    validate_model_name,
)
from ._push import PushResult, push_model
from ._s3 import S3Store
from ._settings import StoreSettings
from ._uri import default_store_uri, open_store

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "PublishedFile",
    "PublishedModel",
    "PushResult",
    "S3Store",
    "ShortObject",
    "Store",
    "StoreSettings",
    "default_store_uri",
    "list_models",
    "open_store",
    "push_model",
    "read_published",
    "validate_model_name",
]
