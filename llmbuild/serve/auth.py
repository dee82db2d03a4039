"""BearerAuth: the API-key check of every API route (and of /ready and /metrics unless --public-probes)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi import Request

from llmbuild.serve.api_error import APIError


class BearerAuth:
    """Accepts `Authorization: Bearer <key>` for any of the keys; with no keys, accepts everyone."""

    def __init__(self, api_keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in api_keys]

    async def __call__(self, request: Request) -> None:
        """The FastAPI dependency: raises a 401 APIError unless the request carries a valid key."""
        self.check(request.headers.get("authorization", ""))

    def check(self, authorization: str) -> None:
        """Raise a 401 APIError unless `authorization` (the header's value) names a valid key."""
        if not self._keys:
            return
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode()
        # compare against every key, always, so timing reveals neither the key nor which one matched
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not ok:
            raise APIError(
                401, "missing or invalid API key; send 'Authorization: Bearer <key>'", "authentication_error"
            )
