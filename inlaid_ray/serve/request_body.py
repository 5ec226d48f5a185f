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


def _readable(key: object) -> str:
    """A path component that is valid UTF-8 whatever the key holds (lone surrogates escaped)."""
    return str(key).encode("utf-8", "backslashreplace").decode("utf-8")[:64]


def _path(node: tuple | None) -> str:
    """The dotted path of a node (parent, key, is_index), built only when an error names it."""
    parts: list[str] = []
    while node is not None:
        node, key, is_index = node
        parts.append(f"[{key}]" if is_index else ("." + _readable(key)))
    return "".join(reversed(parts)).lstrip(".")


def check_json_value(value: Any, max_depth: int) -> None:
    """400 if `value` nests deeper than `max_depth` or holds a string (value or key) that is not
    valid Unicode (a lone surrogate such as "\\ud800", which JSON escapes allow); `param` names the
    place. Memory stays linear in the body: paths are built only for the error."""
    stack: list[tuple[Any, tuple | None, int]] = [(value, None, 0)]
    while stack:
        item, node, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, node)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= max_depth:
            path = _path(node)
            raise OpenAIHTTPError(400, f"the request body nests deeper than {max_depth} levels", code="too_deep",
                                  param=path or None)
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, node)
                stack.append((child, (node, key, False), depth + 1))
        else:
            stack.extend((child, (node, i, True), depth + 1) for i, child in enumerate(item))


def _check_text(text: str, node: tuple | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        path = _path(node)
        raise OpenAIHTTPError(400, f"{path or 'the body'} is not valid Unicode (a lone surrogate)",
                              code="invalid_unicode", param=path or None) from None


async def read_json_body(request: Request, max_bytes: int, max_depth: int) -> Any:
    """The parsed body: 413 past `max_bytes`, 400 for invalid JSON, too deep or invalid Unicode."""
    raw = await read_body(request, max_bytes)
    try:
        value = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and ints past Python's digit limit
        raise OpenAIHTTPError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # nesting deeper than the parser's recursion allows
        raise OpenAIHTTPError(400, f"the request body nests deeper than {max_depth} levels", code="too_deep") from None
    check_json_value(value, max_depth)
    return value
