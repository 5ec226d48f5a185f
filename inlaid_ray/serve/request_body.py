"""Reading a JSON request body defensively: a size limit enforced before the body is read in full
(413), bounded nesting, and text that is valid Unicode (400). Hostile input never reaches the
tokenizer or pydantic, and never becomes a 500."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from inlaid_ray.serve.http_errors import OpenAIHTTPError


def _too_large(max_bytes: int) -> OpenAIHTTPError:
    return OpenAIHTTPError(413, f"the request body exceeds the limit of {max_bytes} bytes", code="request_too_large")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, at most `max_bytes`: a declared larger Content-Length is refused before
    anything is read, and a stream that runs past the limit is cut off where it crosses it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def check_json_value(value: Any, max_depth: int) -> None:
    """400 if `value` nests deeper than `max_depth` or holds a string that is not valid Unicode
    (a lone surrogate such as "\\ud800", which JSON escapes allow); `param` names the place."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise OpenAIHTTPError(400, f"{path or 'the body'} is not valid Unicode (a lone surrogate)",
                                      code="invalid_unicode", param=path or None) from None
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= max_depth:
            raise OpenAIHTTPError(400, f"the request body nests deeper than {max_depth} levels", code="too_deep",
                                  param=path or None)
        if isinstance(item, dict):
            for key, child in item.items():
                stack.append((key, path, depth + 1))  # keys are strings too
                stack.append((child, f"{path}.{key}" if path else str(key), depth + 1))
        else:
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))


async def read_json_body(request: Request, max_bytes: int, max_depth: int) -> Any:
    """The parsed body: 413 past `max_bytes`, 400 for invalid JSON, too deep or invalid Unicode."""
    raw = await read_body(request, max_bytes)
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIHTTPError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # nesting deeper than the parser's recursion allows
        raise OpenAIHTTPError(400, f"the request body nests deeper than {max_depth} levels", code="too_deep") from None
    check_json_value(value, max_depth)
    return value
