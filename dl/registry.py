"""Names in the MLflow model registry: `models:/` URIs resolved to versions, and the alias that serves.

A URI the registry cannot resolve fails with ModelNotFound, naming what the model does have (its versions or
aliases), rather than with the store's own exception.
"""
from __future__ import annotations

import re

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

CHAMPION = "champion"  # the alias scoring reads by default; only the promotion gate moves it

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")


class ModelNotFound(LookupError):
    """A `models:/` URI names a registered model, version or alias the registry does not have."""


def _registered_model(client: MlflowClient, model_uri: str, name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ModelNotFound(f"{model_uri}: the registry has no model named '{name}'") from None


def resolve_model_version(model_uri: str, client: MlflowClient | None = None) -> ModelVersion:
    """The registry version behind `models:/NAME/VERSION`, `models:/NAME/latest` or `models:/NAME@alias`.

    ValueError for a URI of another form; ModelNotFound when the registry has no such model, version or alias.
    """
    match = _MODEL_URI.match(model_uri)
    if not match:
        raise ValueError(
            f"model uri {model_uri!r}: expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@alias")
    name, version, alias = match["name"], match["version"], match["alias"]
    if version not in (None, "latest") and not version.isdigit():
        raise ValueError(f"model uri {model_uri!r}: version must be a number or 'latest'")
    client = client or MlflowClient()
    registered = _registered_model(client, model_uri, name)
    if alias:
        if alias not in registered.aliases:
            aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(registered.aliases.items())) or "none"
            hint = " (`dlpipe promote` sets it)" if alias == CHAMPION else ""
            raise ModelNotFound(f"{model_uri}: model '{name}' has no alias '{alias}'{hint}; its aliases: {aliases}")
        return client.get_model_version_by_alias(name, alias)
    numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    if not numbers:
        raise ModelNotFound(f"{model_uri}: model '{name}' has no versions")
    if version == "latest":
        version = str(numbers[-1])
    if int(version) not in numbers:
        raise ModelNotFound(f"{model_uri}: model '{name}' has no version {version}; "
                            f"its versions: {', '.join(map(str, numbers)) or 'none'}")
    return client.get_model_version(name, str(int(version)))
