"""Model names on the translated APIs (SPEC S11), as pure functions of ``[models]``.

A client of ``/v1/chat/completions`` or ``/v1/messages`` names a model in its own world
(``claude-sonnet-4-5``); ``[models] aliases`` maps such a name onto an upstream model, and
``[models] default`` serves, on ``/v1/messages`` only, every name no alias covers (Claude Code
asks for Claude models by many dated names). A Chat Completions client names upstream models
directly, so there an unknown name goes upstream as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from codexlb.config import ModelsConfig


def upstream_model(models: ModelsConfig, name: str, *, use_default: bool) -> str:
    """The upstream model that serves a request for ``name``."""
    alias = models.aliases.get(name)
    if alias is not None:
        return alias
    if use_default and models.default is not None:
        return models.default
    return name


def client_names(models: ModelsConfig, upstream: Iterable[str]) -> list[str]:
    """The names a client may ask for, each once: the upstream's models, then the aliases."""
    names: dict[str, None] = dict.fromkeys(upstream)
    names.update(dict.fromkeys(models.aliases))
    if models.default is not None:
        names[models.default] = None
    return list(names)


def catalog_slugs(catalog: Any) -> list[str]:
    """The model names of an upstream catalog: Codex's ``{"models": [{"slug"}]}`` or the
    platform's ``{"data": [{"id"}]}``; nothing from anything else."""
    if not isinstance(catalog, dict):
        return []
    entries = catalog.get("models")
    field = "slug"
    if not isinstance(entries, list):
        entries, field = catalog.get("data"), "id"
    if not isinstance(entries, list):
        return []
    return [
        entry[field]
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get(field), str) and entry[field]
    ]


def model_list(names: Iterable[str]) -> dict[str, Any]:
    """``GET /v1/models`` for the SDKs: OpenAI's list (``object``, ``data`` of ``id``,
    ``object``, ``created``, ``owned_by``), whose entries and page fields also read as
    Anthropic's (``type``, ``display_name``, ``created_at``; ``has_more``, ``first_id``,
    ``last_id``)."""
    data = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "codexlb",
            "type": "model",
            "display_name": name,
            "created_at": "1970-01-01T00:00:00Z",
        }
        for name in names
    ]
    return {
        "object": "list",
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
