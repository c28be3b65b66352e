"""The sampling draw made among the top-k words (models/inference._DrawAmongTopK) against transformers' own warpers."""

from collections import Counter

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from shitate.models.inference import _DrawAmongTopK, draw_among_top_k, sampling_settings


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, 10, 0.8), (1.0, 50, 1.0), (1.3, 5, 0.5)])
def test_the_draw_follows_generates_distribution(temperature, top_k, top_p):
    torch.manual_seed(0)
    scores, ids = torch.randn(1, 60) * 2, torch.zeros(1, 1, dtype=torch.long)
    warped = TemperatureLogitsWarper(temperature)(ids, scores.clone())
    warped = TopPLogitsWarper(top_p)(ids, TopKLogitsWarper(top_k)(ids, warped))
    expected = warped.softmax(-1)[0]
    draw, draws = _DrawAmongTopK(temperature, top_k, top_p), 6000
    picks = [draw(ids, scores.clone())[0] for _ in range(draws)]
    assert all(int((p == 0).sum()) == 1 and int(torch.isinf(p).sum()) == 59 for p in picks[:10])  # one word left
    counts = Counter(int(p.argmax()) for p in picks)
    observed = torch.tensor([counts.get(word, 0) / draws for word in range(60)])
    assert set(counts) <= set(expected.nonzero().flatten().tolist())  # never a word generate() would not draw
    torch.testing.assert_close(observed, expected, rtol=0, atol=0.025)  # 4 standard deviations at p = 0.5


def test_sampling_settings_draw_among_top_k_or_leave_the_draw_to_generate():
    class Model:
        generation_config = GenerationConfig()

    assert sampling_settings(Model(), 0.0, 0.9) == {"do_sample": False}
    settings = sampling_settings(Model(), 0.8, 0.9)
    assert settings["do_sample"] is False and settings["logits_processor"][0].top_k == 50  # transformers' default
    Model.generation_config = GenerationConfig(top_k=0)  # no top-k: every word needs a number anyway
    assert sampling_settings(Model(), 0.8, 0.9) == {"do_sample": True, "temperature": 0.8, "top_p": 0.9}
    Model.generation_config = GenerationConfig(top_k=20, min_p=0.1)  # a filter the draw does not make
    assert sampling_settings(Model(), 0.8, 0.9)["do_sample"] is True


@pytest.mark.parametrize("per_row_top_k", [False, True])
def test_each_row_is_drawn_with_its_own_temperature_top_k_and_top_p(per_row_top_k):
    # The server's batcher draws for many requests in one call, each with its own settings.
    torch.manual_seed(0)
    scores, ids = torch.randn(3, 60) * 2, torch.zeros(1, 1, dtype=torch.long)
    settings = [(0.7, 10, 0.8), (1.3, 4, 0.9), (1.0, 25, 1.0)] if per_row_top_k else [(0.7, 10, 0.8), (1.3, 10, 0.5)]
    expected = torch.stack([TopPLogitsWarper(p)(ids, TopKLogitsWarper(k)(ids, TemperatureLogitsWarper(t)(
        ids, scores[i:i + 1].clone()))).softmax(-1)[0] for i, (t, k, p) in enumerate(settings)])
    rows, draws = len(settings), 6000
    temperature, top_k, top_p = (torch.tensor([row[i] for row in settings]).repeat(draws) for i in range(3))
    drawn = draw_among_top_k(scores[:rows].repeat(draws, 1), temperature, top_k if per_row_top_k else 10, top_p)
    drawn = drawn.view(draws, rows)
    observed = torch.stack([torch.bincount(drawn[:, row], minlength=60) / draws for row in range(rows)])
    assert all(set(drawn[:, row].tolist()) <= set(expected[row].nonzero().flatten().tolist()) for row in range(rows))
    torch.testing.assert_close(observed, expected, rtol=0, atol=0.025)
