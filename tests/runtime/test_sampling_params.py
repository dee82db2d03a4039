"""resolve_sampling_params: a request's options over the engine's manifest defaults."""

from __future__ import annotations

import pytest

from llmbuild.errors import RequestError
from llmbuild.recipe import ServeSection
from llmbuild.runtime.sampling_params import SamplingParams, resolve_sampling_params

DEFAULTS = ServeSection(max_tokens=100, temperature=0.7, top_p=0.8, top_k=40)


def test_unset_options_take_the_defaults():
    assert resolve_sampling_params(DEFAULTS) == SamplingParams(max_tokens=100, temperature=0.7, top_p=0.8, top_k=40)


def test_set_options_win_even_when_falsy():
    p = resolve_sampling_params(DEFAULTS, max_tokens=3, temperature=0.0, top_p=1.0, top_k=0)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k) == (3, 0.0, 1.0, 0)


def test_other_fields_pass_through():
    p = resolve_sampling_params(DEFAULTS, seed=5, stop=("x",), ignore_eos=True, logprobs=2)
    assert (p.seed, p.stop, p.ignore_eos, p.logprobs, p.max_tokens) == (5, ("x",), True, 2, 100)


def test_max_seq_len_caps_requested_and_default_max_tokens():
    assert resolve_sampling_params(DEFAULTS, max_seq_len=64).max_tokens == 64
    assert resolve_sampling_params(DEFAULTS, max_tokens=500, max_seq_len=256).max_tokens == 256
    assert resolve_sampling_params(DEFAULTS, max_tokens=500).max_tokens == 500


def test_invalid_values_are_request_errors():
    with pytest.raises(RequestError, match="top_k must be >= 0"):
        resolve_sampling_params(DEFAULTS, top_k=-1)
