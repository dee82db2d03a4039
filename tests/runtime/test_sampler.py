from __future__ import annotations

import pytest
import torch

from llmbuild.errors import RequestError
from llmbuild.runtime.request import Request
from llmbuild.runtime.sampler import Sampler, filtered_probs
from llmbuild.runtime.sampling_params import SamplingParams

V = 10
EOS = 9


def req(prompt=(1,), output=(), **params) -> Request:
    sp = SamplingParams(max_tokens=32, **params)
    g = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
    r = Request("r", list(prompt), sp, max_tokens=32, generator=g)
    r.output_token_ids = list(output)
    return r


def sample(logits, r: Request, n: int = 1) -> list[int]:
    s = Sampler(V, frozenset({EOS}))
    return [s.sample(logits[None], [r])[0] for _ in range(n)]


def test_greedy_is_argmax():
    logits = torch.tensor([0.0, 3, 1, 5, 2, 0, 0, 0, 0, 0])
    assert sample(logits, req(temperature=0)) == [3]


def test_top_k_keeps_k_best():
    probs = filtered_probs(torch.tensor([0.0, 3, 1, 5, 2, 0, 0, 0, 0, 0]), SamplingParams(top_k=2))
    assert set(torch.nonzero(probs).flatten().tolist()) == {1, 3}
    assert probs.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_smallest_covering_set():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9]))
    kept = torch.nonzero(filtered_probs(logits, SamplingParams(top_p=0.8))).flatten().tolist()
    assert kept == [0, 1]
    kept = torch.nonzero(filtered_probs(logits, SamplingParams(top_p=0.81))).flatten().tolist()
    assert kept == [0, 1, 2]
    kept = torch.nonzero(filtered_probs(logits, SamplingParams(top_p=0.01))).flatten().tolist()
    assert kept == [0]


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9]))
    kept = torch.nonzero(filtered_probs(logits, SamplingParams(min_p=0.1))).flatten().tolist()
    assert kept == [0, 1]


def test_seed_reproduces_and_differs_across_seeds():
    logits = torch.zeros(V)
    a = sample(logits, req(seed=1), 20)
    assert a == sample(logits, req(seed=1), 20)
    assert a != sample(logits, req(seed=2), 20)


def test_temperature_sharpens():
    logits = torch.tensor([2.0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    cold = sample(logits, req(temperature=0.05, seed=0), 50)
    hot = sample(logits, req(temperature=5.0, seed=0), 50)
    assert cold.count(0) == 50
    assert len(set(hot)) > 3


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    s = Sampler(V, frozenset())
    logits = torch.tensor([4.0, -2.0, 3.0, 0, 0, 0, 0, 0, 0, 0])
    r = req(prompt=(0,), output=(1,), repetition_penalty=2.0)
    adjusted = s._adjust(logits.clone(), r.params, r.prompt_token_ids, r.output_token_ids)
    assert adjusted[0].item() == 2.0 and adjusted[1].item() == -4.0 and adjusted[2].item() == 3.0
    assert sample(logits, req(prompt=(0,), repetition_penalty=2.0, temperature=0)) == [2]


def test_presence_and_frequency_penalties_count_output_tokens():
    s = Sampler(V, frozenset())
    r = req(prompt=(5,), output=(3, 3, 4), presence_penalty=0.5, frequency_penalty=1.0)
    adjusted = s._adjust(torch.zeros(V), r.params, r.prompt_token_ids, r.output_token_ids)
    assert adjusted[3].item() == pytest.approx(-2.5)
    assert adjusted[4].item() == pytest.approx(-1.5)
    assert adjusted[5].item() == 0.0  # prompt tokens are not penalised


def test_min_tokens_suppresses_eos():
    logits = torch.zeros(V)
    logits[EOS] = 10.0
    assert sample(logits, req(temperature=0, min_tokens=2)) == [0]
    assert sample(logits, req(output=(1, 1), temperature=0, min_tokens=2)) == [EOS]


def test_mixed_batch_rows_use_their_own_params():
    s = Sampler(V, frozenset())
    logits = torch.tensor([[0.0, 1, 9, 0, 0, 0, 0, 0, 0, 0]] * 2)
    greedy = req(temperature=0)
    penalised = req(output=(2,), temperature=0, frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=2.0)
    assert s.sample(logits, [greedy, penalised]) == [2, 1]


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(min_p=2),
        dict(max_tokens=0),
        dict(repetition_penalty=0),
        dict(presence_penalty=3),
        dict(min_tokens=100),
        dict(stop=("",)),
    ],
)
def test_invalid_params_are_refused(bad):
    with pytest.raises(RequestError):
        SamplingParams(**bad)


def test_logprobs_are_of_the_raw_distribution_with_top_alternatives():
    logits = torch.tensor([0.0, 3, 1, 5, 2, 0, 0, 0, 0, 0])
    r = req(temperature=0.5, logprobs=2, seed=3)
    plain = req()
    s = Sampler(V, frozenset({EOS}))
    lp, none = s.logprobs(torch.stack([logits, logits]), [r, plain], [1, 3])
    expected = torch.log_softmax(logits, -1)
    assert none is None
    assert lp.token_id == 1 and lp.logprob == pytest.approx(float(expected[1]))
    assert [t for t, _ in lp.top] == [3, 1]
    assert lp.top[0][1] == pytest.approx(float(expected[3]))


def test_negative_logprobs_is_refused():
    with pytest.raises(RequestError, match="logprobs"):
        SamplingParams(logprobs=-1)


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_sampling_of_drafted_tokens_keeps_the_target_distribution():
    """Proposals drawn from a draft's q (here far from the target's p) are kept with probability min(1, p/q);
    each emitted token is distributed as p (chi-square bounds), and the first is kept as often as
    sum(min(p, q)) says (Leviathan et al., theorem 3.5)."""
    p = torch.tensor([[0.05, 0.1, 0.4, 0.25, 0.15, 0.05], [0.3, 0.3, 0.1, 0.1, 0.1, 0.1], [1 / 6] * 6])
    q = torch.tensor([[0.3, 0.3, 0.1, 0.1, 0.1, 0.1], [0.05, 0.1, 0.4, 0.25, 0.15, 0.05]])
    sampler, draws = Sampler(6, frozenset()), torch.Generator().manual_seed(1)
    request = req(temperature=1.0, seed=5)
    first, second, kept_first, n = torch.zeros(6), torch.zeros(6), 0, 20000
    for _ in range(n):
        proposal = [int(torch.multinomial(q[j], 1, generator=draws)) for j in range(2)]
        (token,), (kept,) = sampler.verify(p.log(), [request], [proposal], [q])
        emitted = [*proposal[:kept], token]
        first[emitted[0]] += 1
        if kept >= 1:
            kept_first += 1
            second[emitted[1]] += 1
    assert _chi2(first, p[0]) < 20.5 and _chi2(second, p[1]) < 20.5  # 5 degrees of freedom: p = 0.001
    accept = float(torch.minimum(p[0], q[0]).sum())  # 0.6
    assert abs(kept_first / n - accept) < 4 * (accept * (1 - accept) / n) ** 0.5


def test_a_draft_equal_to_the_target_is_always_kept():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0, 0.0]] * 4)
    request, draws = req(temperature=1.0, seed=2), torch.Generator().manual_seed(3)
    for _ in range(200):
        proposal = [int(torch.multinomial(p[j], 1, generator=draws)) for j in range(3)]
        (token,), (kept,) = Sampler(6, frozenset()).verify(p.log(), [request], [proposal], [p[:3]])
        assert kept == 3 and token < 4
