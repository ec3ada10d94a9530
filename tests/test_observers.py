import pytest
import torch

from qwenvl_dq import int8, observers
from qwenvl_dq.observers import ActObserver, histogram, histogram_range


def test_min_max_are_exact_over_samples_and_channels():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 20 + k, 8, generator=g) * (k + 1) for k in range(3)]
    obs = ActObserver()
    for x in xs:
        obs.update(x)
    cat = torch.cat([x.reshape(-1, 8) for x in xs])
    assert torch.equal(obs.ch_min, cat.amin(0)) and torch.equal(obs.ch_max, cat.amax(0))
    assert obs.tokens == cat.shape[0]
    s, o = obs.qparams("minmax")
    s_ref, o_ref = int8.act_qparams(float(cat.min()), float(cat.max()))
    assert torch.equal(s, s_ref) and torch.equal(o, o_ref)


def test_an_observer_without_a_histogram_keeps_the_same_ranges_and_refuses_the_histogram_method():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(30 + k, 16, generator=g) * (k + 1) for k in range(3)]
    full, ranges = ActObserver(), ActObserver(histogram=False)
    for x in xs:
        full.update(x)
        ranges.update(x)
    assert torch.equal(ranges.ch_min, full.ch_min) and torch.equal(ranges.ch_max, full.ch_max)
    assert ranges.tokens == full.tokens == 93 and ranges.hist is None
    assert all(torch.equal(a, b) for a, b in zip(ranges.qparams("minmax"), full.qparams("minmax")))
    with pytest.raises(ValueError, match="kept no histogram"):
        ranges.qparams("histogram")


def test_histogram_counts_as_torch_histc_does(monkeypatch):
    """Same bins as torch.histc's cpu kernel, also for values on the bin edges and at both ends, block by block."""
    monkeypatch.setattr(observers, "HIST_BLOCK", 1000)  # several blocks
    g = torch.Generator().manual_seed(3)
    bins = 2048
    for trial in range(12):
        lo = float(torch.randn(1, generator=g) * 5)
        hi = lo + float(torch.rand(1, generator=g) * 40 + 1e-3)
        lo32, hi32 = torch.tensor(lo), torch.tensor(hi)
        k = torch.randint(0, bins + 1, (20000,), generator=g)
        edges = lo32 + (hi32 - lo32) * k.float() / bins  # on (or a rounding away from) the edges
        x = torch.cat([edges, torch.rand(10000, generator=g) * (hi32 - lo32) + lo32, torch.stack([lo32, hi32])])
        x = x[(x >= lo32) & (x <= hi32)].reshape(-1, 2) if trial % 2 else x[(x >= lo32) & (x <= hi32)]
        got = histogram(x, bins, lo, hi)
        assert got.dtype == torch.int64 and int(got.sum()) == x.numel()
        assert torch.equal(got.float(), torch.histc(x, bins, lo, hi)), trial
    assert torch.equal(histogram(torch.full((5,), 2.0), 8, 2.0, 2.0), torch.histc(torch.full((5,), 2.0), 8, 2.0, 2.0)
                       .long())  # a range of zero width: histc's own rule


def test_widening_keeps_every_count():
    obs = ActObserver(bins=64)
    obs.update(torch.linspace(-1, 1, 1000)[:, None])
    obs.update(torch.linspace(-4, 3, 500)[:, None])
    assert abs(float(obs.hist.sum()) - 1500) < 1e-6
    assert obs.lo == -4.0 and obs.hi == 3.0
    # the first sample's mass stays inside [-1, 1]
    edges = torch.linspace(obs.lo, obs.hi, 65)
    inside = (edges[:-1] >= -1.0 - 7 / 64) & (edges[1:] <= 1.0 + 7 / 64)
    assert float(obs.hist[inside].sum()) >= 1000


def _quant_mse(x, lo, hi):
    s, o = int8.act_qparams(lo, hi)
    return float(((int8.fake_quant_act(x, s, o) - x) ** 2).mean())


def test_histogram_range_clips_a_lone_outlier_among_many_tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400000, 1, generator=g)
    x[0, 0] = 40.0  # one token far out: clipping it costs less than the coarser grid for 400k tokens
    obs = ActObserver()
    obs.update(x)
    lo, hi = histogram_range(obs.hist, obs.lo, obs.hi)
    assert obs.lo <= lo < -3.5 and 3.5 < hi < 30.0, (lo, hi)
    mse_hist, mse_minmax = _quant_mse(x, lo, hi), _quant_mse(x, obs.lo, obs.hi)
    assert mse_hist < 0.7 * mse_minmax, (mse_hist, mse_minmax)


def test_histogram_range_is_the_best_of_its_grid():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(5000, 1, generator=g), 12 * torch.rand(40, 1, generator=g)])
    obs = ActObserver(bins=256)
    obs.update(x)
    lo, hi = histogram_range(obs.hist, obs.lo, obs.hi)
    best = _quant_mse(x, lo, hi)
    width = (obs.hi - obs.lo) / 256
    for a in range(0, 128, 8):
        for b in range(256, 128, -8):
            assert best <= _quant_mse(x, obs.lo + a * width, obs.lo + b * width) * 1.05


def test_histogram_range_keeps_everything_for_uniform_data():
    obs = ActObserver()
    obs.update(torch.linspace(-2, 5, 10000)[:, None])
    lo, hi = histogram_range(obs.hist, obs.lo, obs.hi)
    assert lo <= -1.9 and hi >= 4.9


def test_reservoir_windows_depend_only_on_sample_index_and_length():
    from qwenvl_dq.observers import MIN_WINDOW, Reservoir

    xs = {k: torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 1000 * k for k, n in enumerate([50, 300, 900])}
    a, b = Reservoir(3, budget=600), Reservoir(3, budget=600)
    for k in (0, 1, 2):
        a.add(k, xs[k])
    for k in (2, 0, 1):
        b.add(k, xs[k][None])  # arrival order and a batch axis change nothing
    assert [(k, s, e) for k, s, e, _ in a.items()] == [(k, s, e) for k, s, e, _ in b.items()]
    for (k, s, e, w), (_, _, _, w2) in zip(a.items(), b.items()):
        assert torch.equal(w, w2) and torch.equal(w, xs[k][s:e])
    (k0, s0, e0, _), (_, s1, e1, _), (_, s2, e2, _) = a.items()
    assert (s0, e0) == (0, 50)  # a short sample is kept whole
    assert e1 - s1 == 200 and e2 - s2 == 200  # budget 600 over 3 samples
    assert Reservoir(1000, budget=600).per_sample == MIN_WINDOW  # windows keep enough context for attention
