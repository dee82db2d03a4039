"""The bearer-key check alone."""

from __future__ import annotations

import pytest

from llmbuild.serve.api_error import APIError
from llmbuild.serve.auth import BearerAuth


def test_any_configured_key_passes():
    auth = BearerAuth(["sk-one", "sk-two"])
    auth.check("Bearer sk-one")
    auth.check("bearer  sk-two ")


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer sk-three", "Basic sk-one", "sk-one"])
def test_anything_else_is_401_naming_the_scheme(header):
    with pytest.raises(APIError) as err:
        BearerAuth(["sk-one", "sk-two"]).check(header)
    assert (err.value.status, err.value.kind) == (401, "authentication_error")
    assert err.value.response().headers["www-authenticate"] == "Bearer"


def test_no_keys_means_no_authentication():
    BearerAuth([]).check("")
