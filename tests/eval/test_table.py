"""The perplexity plot's x axis: every tick sits exactly at the percent its label prints."""

from __future__ import annotations

import pytest

from sawkv.eval.table import percent_label, percent_tick_step, plot_results


@pytest.mark.parametrize("span", [0.03, 0.06, 0.12, 0.26, 0.5, 2.0])
def test_tick_step_is_a_whole_percent_and_few_ticks(span):
    step = percent_tick_step(span)
    pct = round(step * 100, 9)
    assert pct == int(pct) and int(pct) in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    assert span / step <= 8


def test_percent_label():
    assert [percent_label(x) for x in (1.0, 1.03, 0.98, 1.25)] == ["+0%", "+3%", "-2%", "+25%"]


def test_plot_ticks_match_their_labels(tmp_path, monkeypatch):
    """Regression: an automatic locator put a tick at 1.025 and labelled it "+3%"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = {}
    real_savefig = plt.Figure.savefig

    def grab(fig, *a, **k):
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks = [x for x in ax.get_xticks() if lo <= x <= hi]
        fmt = ax.xaxis.get_major_formatter()
        seen["pairs"] = [(x, fmt(x)) for x in ticks]
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(plt.Figure, "savefig", grab)
    results = [
        {"label": "auto", "method": "auto", "ppl": 20.0, "bits_per_element": 32.0,
         "window_nll": [3.0, 3.0]},
        {"label": "a", "method": "a", "ppl": 20.5, "bits_per_element": 4.5,
         "window_nll": [3.02, 3.03]},
        {"label": "b", "method": "b", "ppl": 23.0, "bits_per_element": 4.25,
         "window_nll": [3.05, 3.06]},
    ]  # fmt: skip
    plot_results(results, str(tmp_path / "p.png"))
    pairs = seen["pairs"]
    assert len(pairs) >= 3
    for x, label in pairs:
        assert label == f"{round(100 * (x - 1)):+d}%"
        assert abs(100 * (x - 1) - round(100 * (x - 1))) < 1e-6, (x, label)
