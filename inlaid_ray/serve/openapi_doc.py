"""The OpenAPI document names the JSON body of every route that parses its own body.

The routes read the raw body (serve/request_body.py enforces the size and nesting limits before
parsing), so FastAPI cannot see their models; without this, `/openapi.json` would describe
`/v1/chat/completions` as taking no body, and neither SDK generators nor API fuzzers would
know its fields. The schemas are the same pydantic models the routes validate with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

COMPONENTS = "#/components/schemas/{model}"


def document_request_bodies(app: FastAPI, bodies: Mapping[tuple[str, str], type[BaseModel]]) -> None:
    """Make `app.openapi()` describe each `(path, method)`'s required JSON body as its model."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for (path, method), model in bodies.items():
            model_schema = model.model_json_schema(ref_template=COMPONENTS)
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
            schema["paths"][path][method]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": COMPONENTS.format(model=model.__name__)}}},
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override point
