"""RequestModel: the base of every request body model (strict known fields, unknown ones set aside)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RequestModel(BaseModel):
    """Strict types for known fields; unknown keys kept aside (model_extra) and reported, never used."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False, frozen=True)

    def ignored_fields(self, prefix: str = "") -> list[str]:
        """Dotted paths of the keys no field took, nested objects included (list items share one path)."""
        found = dict.fromkeys(prefix + key for key in self.model_extra or {})  # a dict: ordered, deduplicated
        for name in type(self).model_fields:
            value = getattr(self, name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, RequestModel):
                    found.update(dict.fromkeys(item.ignored_fields(f"{prefix}{name}.")))
        return list(found)
