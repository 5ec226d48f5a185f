"""The project's exception types; `serve/` maps them to HTTP status codes in one place."""


class InlaidError(Exception):
    """Base class of every error inlaid-ray raises on purpose."""


class ModelLoadError(InlaidError, ValueError):
    """A base model directory is missing files or describes an unsupported architecture."""


class AdapterError(InlaidError, ValueError):
    """A LoRA adapter is missing, corrupt, unsafe (pickle) or does not fit the base model."""


class TaskNotFound(InlaidError, KeyError):
    """A request or command named a task (adapter) that is not known."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "task not found"


class InvalidRequest(InlaidError, ValueError):
    """A generation request is malformed: bad sampling values, prompt too long, ..."""


class NoFreeSlot(InlaidError, RuntimeError):
    """The adapter bank (or KV cache) has no room left for what was asked."""


def first_validation_error(exc: Exception) -> str:
    """One line for a pydantic ValidationError: the first error's field path and message."""
    first = exc.errors(include_url=False)[0]  # type: ignore[attr-defined]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
