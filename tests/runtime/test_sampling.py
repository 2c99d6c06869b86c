"""Sampling controls: each filter keeps exactly the tokens its definition says, seeds repeat."""

from __future__ import annotations

import pytest
import torch

from leanlm.errors import LeanLMError
from leanlm.runtime.sampling import SamplingParams, apply_repeat_penalty, filter_logits, sample
from leanlm.runtime.stops import StopStrings

LOGITS = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))


def kept(logits: torch.Tensor) -> list[int]:
    return (logits[0] > torch.finfo(logits.dtype).min).nonzero().flatten().tolist()


def test_top_k_keeps_k_most_likely() -> None:
    assert kept(filter_logits(LOGITS, 2, 1.0, 0.0)) == [0, 1]


def test_top_p_keeps_smallest_nucleus_reaching_p() -> None:
    assert kept(filter_logits(LOGITS, 0, 0.7, 0.0)) == [0, 1]  # 0.5 + 0.2 reaches 0.7
    assert kept(filter_logits(LOGITS, 0, 0.71, 0.0)) == [0, 1, 2]
    assert kept(filter_logits(LOGITS, 0, 0.01, 0.0)) == [0]  # the top token always survives


def test_min_p_is_relative_to_the_top_probability() -> None:
    assert kept(filter_logits(LOGITS, 0, 1.0, 0.3)) == [0, 1, 2]  # >= 0.3 * 0.5 = 0.15
    assert kept(filter_logits(LOGITS, 0, 1.0, 0.31)) == [0, 1]


def test_filters_work_on_shuffled_vocab() -> None:
    perm = torch.tensor([3, 0, 4, 1, 2])
    out = filter_logits(LOGITS[:, perm], 0, 0.7, 0.0)
    assert sorted(perm[kept(out)].tolist()) == [0, 1]


def test_repeat_penalty_follows_llamacpp_rule() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repeat_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_greedy_is_argmax_and_penalty_can_change_it() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    assert sample(logits, SamplingParams(temperature=0)).item() == 0
    p = SamplingParams(temperature=0, repeat_penalty=1.5)
    assert sample(logits, p, torch.tensor([[0]])).item() == 1


def test_same_seed_same_draws_and_distribution_matches() -> None:
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    logits = LOGITS.expand(4000, -1)
    a = sample(logits, p, generator=torch.Generator().manual_seed(7))
    b = sample(logits, p, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=5).float() / len(a)
    assert torch.allclose(freq, LOGITS.exp()[0], atol=0.03)


def test_low_temperature_concentrates_mass() -> None:
    p = SamplingParams(temperature=0.05, top_k=0, top_p=1.0, min_p=0.0)
    draws = sample(LOGITS.expand(500, -1), p, generator=torch.Generator().manual_seed(0))
    assert (draws == 0).all()


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                                dict(top_k=-1), dict(max_tokens=-1), dict(repeat_penalty=0)])
def test_out_of_range_parameters_are_refused(kw: dict) -> None:
    with pytest.raises(LeanLMError):
        SamplingParams(**kw)


def _run_stops(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    s = StopStrings(stops)
    out = "".join(s.push(p) for p in pieces)
    if not s.stopped:
        out += s.flush()
    return out, s.stopped


def test_stop_string_split_across_pieces_is_cut() -> None:
    assert _run_stops(["END"], ["hello E", "N", "D and more"]) == ("hello ", True)


def test_partial_stop_prefix_is_released_when_it_does_not_match() -> None:
    assert _run_stops(["END"], ["hello E", "N", "d"]) == ("hello ENd", False)
    assert _run_stops(["\n\n"], ["a\n", "b"]) == ("a\nb", False)


def test_earliest_of_several_stops_wins() -> None:
    assert _run_stops(["world", "lo"], ["hello world"]) == ("hel", True)
