"""The base of every config model, and the rule for what part of a config enters a stage key.

Each stage's config model lives in its stage module and derives from `KpodModel`: unknown
fields are errors, every field has a description (it becomes the Prefect UI form's help text).
A field that cannot change a stage's output (concurrency, a cost budget, a device) is declared
with `runtime_field(...)`; it is dropped from the key, so changing it reuses the cache.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_RUNTIME = "kpod_runtime"  # json_schema_extra marker: not part of the stage key


class KpodModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def hashable(self) -> dict[str, Any]:
        """This model as JSON data, minus runtime-only fields (recursively)."""
        return _strip_runtime(self)


def runtime_field(default: Any, description: str, **kw: Any) -> Any:
    """A field that never changes the output, so it is excluded from stage keys."""
    extra = dict(kw.pop("json_schema_extra", None) or {})
    extra[_RUNTIME] = True
    return Field(default, description=description, json_schema_extra=extra, **kw)


def _strip_runtime(value: Any) -> Any:
    if isinstance(value, BaseModel):
        out = {}
        for name, field in type(value).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get(_RUNTIME):
                continue
            out[name] = _strip_runtime(getattr(value, name))
        return out
    if isinstance(value, dict):
        return {k: _strip_runtime(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strip_runtime(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):  # enums
        return value.value
    return value
