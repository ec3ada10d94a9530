"""Anti-outlier smoothing: exact in float, searches that return their own minimum, factors the merge folds."""

import pytest
import torch
import transformers

from qwenvl_dq import calib_data, calibrate, int8, qwen2vl, smooth
from qwenvl_dq.checkpoint import Checkpoint
from conftest import one_rank


def outlier_problem(seed=0, tokens=96, channels=24, outs=(16, 16), gated=False):
    """A group of linears reading x with a few outlier channels (x 30) and non-zero channel centres."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g) + torch.randn(channels, generator=g) * 0.5
    x[:, [3, 11]] *= 30
    ws = [torch.randn(o, channels, generator=g) * 0.2 for o in outs]
    bs = [torch.randn(o, generator=g) * 0.1 for o in outs]
    if gated:
        def output(xs, w, b):
            return [torch.nn.functional.silu(xx @ w[0].T + b[0]) * (xx @ w[1].T + b[1]) for xx in xs]
    else:
        def output(xs, w, b):
            return [torch.cat([xx @ wi.T + bi for wi, bi in zip(w, b)], dim=-1) for xx in xs]
    windows = [x[:40], x[40:]]
    return smooth.Problem(x=windows, ch_min=x.amin(0), ch_max=x.amax(0), weights=ws, biases=bs, output=output)


def brute_force_loss(p, s):
    """The quantized group output error for scale s, written out step by step with no shared helper but int8's."""
    xs = [xx / s for xx in p.x]
    lo = min(float((p.ch_min / s).min()), 0.0)
    hi = max(float((p.ch_max / s).max()), 0.0)
    scale = (hi - lo) / 255
    offset = min(127, max(-128, -128 - round(lo / scale)))
    scale = torch.tensor(scale, dtype=torch.float32)  # saved as float32
    qx = [((xx / scale + offset).round().clamp(-128, 127) - offset) * scale for xx in xs]
    qw = []
    for w in p.weights:
        ws = w * s
        step = ws.abs().amax(dim=1, keepdim=True) / 127
        qw.append((ws / step).round().clamp(-127, 127) * step)
    want = p.output(p.x, p.weights, p.biases)
    got = p.output(qx, qw, p.biases)
    return sum(float(((a - b) ** 2).sum()) for a, b in zip(got, want)) / sum(xx.shape[0] for xx in p.x)


@pytest.mark.parametrize("gated", [False, True])
def test_m2_search_returns_the_grid_point_with_the_lowest_loss(gated):
    base = outlier_problem(gated=gated)
    p = smooth.shifted(base, smooth.m2_shift(base.ch_min, base.ch_max))
    s, losses, grid = smooth.m2_search(p, n=40)
    r = torch.maximum(p.ch_max, -p.ch_min).double()
    brute = [brute_force_loss(p, (r / float(t)).clamp_min(1).float()) for t in grid]
    assert losses == pytest.approx(brute, rel=1e-4)
    best = min(range(len(brute)), key=brute.__getitem__)
    assert torch.equal(s, (r / float(grid[best])).clamp_min(1).float())
    assert losses.index(min(losses)) == best
    assert float(grid[0]) == pytest.approx(float(r.max()))  # the first candidate is "no smoothing"
    assert losses[best] < 0.5 * losses[0]  # the outliers make smoothing worth it on this layer
    assert float(s[3]) > 1 and float(s[11]) > 1


def test_m4_rounds_lower_the_loss_and_respect_tied_channels():
    p = outlier_problem(gated=False, channels=24)
    p.tie = torch.arange(24) % 12  # channel c and c + 12 share a factor (like query heads on one kv head)
    s, history = smooth.m4_search(p)
    assert history, "m4 applied no round on a layer with outliers"
    want = smooth.target(p)
    start = smooth.loss(p, want, torch.ones(24))
    losses = [start] + [lv for _, lv in history]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert smooth.loss(p, want, s) == pytest.approx(losses[-1], rel=1e-5)
    assert brute_force_loss(p, s) == pytest.approx(losses[-1], rel=1e-4)
    assert torch.equal(s[:12], s[12:])
    assert float(s.min()) >= smooth.SCALE_FLOOR


def test_fold_is_an_exact_equivalence_for_norm_and_linear():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 8, generator=g)
    ln = torch.nn.LayerNorm(8)
    ln.weight.data, ln.bias.data = torch.randn(8, generator=g), torch.randn(8, generator=g)
    w, b = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    s, z, r = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g), torch.rand(6, generator=g) + 0.5
    nw, nb = smooth.fold_norm(ln.weight.data, ln.bias.data, {smooth.NORM_SCALE: s, smooth.NORM_SHIFT: z})
    lw, lb = smooth.fold_linear(w, b, {smooth.IN_SCALE: s, smooth.IN_SHIFT: z, smooth.OUT_SCALE: r})
    before = (ln(x) @ w.T + b) / r
    after = torch.nn.functional.layer_norm(x, (8,), nw, nb) @ lw.T + lb
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def full_model(path, dtype):
    kw = {"dtype" if qwen2vl.TF5 else "torch_dtype": dtype}
    return transformers.Qwen2VLForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa", **kw)


def forward(model, samples, arch):
    outs = []
    with torch.no_grad():
        for s in samples:
            pos = qwen2vl.rope_index(model, s.input_ids, s.image_grid_thw, arch.image_token_id)
            outs.append(model(input_ids=s.input_ids, pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                              position_ids=pos).logits.float())
    return outs


def fold_into(model, factors, dtype):
    """Apply every recorded factor to the full HF model's parameters (state-dict names = checkpoint names)."""
    state = model.state_dict()
    ckpt_names = {}
    for key in state:  # 5.x nests the modules; map checkpoint prefixes to state-dict keys
        k = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        ckpt_names[k] = key
    prefixes = {k.rsplit(".", 1)[0] for k in factors}
    for p in prefixes:
        f = smooth.module_factors(factors, p)
        params = {leaf: state[ckpt_names[f"{p}.{leaf}"]] for leaf in ("weight", "bias") if f"{p}.{leaf}" in ckpt_names}
        for leaf, v in smooth.fold(params, f).items():
            state[ckpt_names[f"{p}.{leaf}"]].copy_(v.to(dtype))
    return len(prefixes)


@pytest.mark.parametrize("method", ["m2", "m4"])
def test_smoothing_leaves_the_float_model_unchanged(tiny_model, calib_dir, method):
    samples = calib_data.load_samples(calib_dir, tiny_model, limit=2)
    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(tiny_model))
    skeleton = qwen2vl.build_skeleton(qwen2vl.load_hf_config(tiny_model, False), torch.bfloat16)
    results = calibrate.calibrate(one_rank(skeleton, Checkpoint(tiny_model), arch, "histogram", method), samples,
                                  len(samples))
    factors = {k: v for k, v in results.items() if k.rsplit(".", 1)[1] in smooth.KEYS}
    kinds = {k.rsplit(".", 1)[1] for k in factors}
    want = {smooth.NORM_SCALE, smooth.IN_SCALE} | (
        {smooth.NORM_SHIFT, smooth.IN_SHIFT} if method == "m2" else {smooth.OUT_SCALE})
    assert kinds == want
    for key in ("visual.blocks.0.norm1", "visual.blocks.1.norm2", "model.layers.0.input_layernorm",
                "model.layers.2.post_attention_layernorm"):
        assert not torch.equal(factors[f"{key}.{smooth.NORM_SCALE}"], torch.ones(1).expand(arch.hidden_size
                               if key.startswith("model") else arch.vision_embed_dim)), key
    if method == "m4":
        v = factors[f"model.layers.1.self_attn.v_proj.{smooth.OUT_SCALE}"]
        o = factors[f"model.layers.1.self_attn.o_proj.{smooth.IN_SCALE}"]
        _, rows, tie = qwen2vl.v_layout("decoder", arch)
        assert v.shape == (rows,) and torch.equal(o, v[tie])  # grouped-query heads share v's factor
        assert not torch.equal(v, torch.ones_like(v))

    # float32: the smoothed model computes the same logits up to float rounding
    ref = full_model(tiny_model, torch.float32)
    before = forward(ref, samples, arch)
    assert fold_into(ref, factors, torch.float32) >= 4 * (arch.num_layers + arch.vision_depth)
    after = forward(ref, samples, arch)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))

    # bfloat16, the saved dtype: equal to bf16 rounding (the logits' cosine to the unsmoothed bf16 run)
    bf = full_model(tiny_model, torch.bfloat16)
    before = forward(bf, samples, arch)
    fold_into(bf, factors, torch.bfloat16)
    after = forward(bf, samples, arch)
    for a, b in zip(after, before):
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert float(cos) > 0.9999
        assert float((a - b).abs().max()) < 0.05 * float(b.abs().max())


def test_fake_quant_weight_is_the_saved_int8_round_trip():
    w = torch.randn(5, 9)
    scale = int8.weight_scale(w)
    torch.testing.assert_close(smooth.fake_quant_weight(w), int8.dequantize_weight(int8.quantize_weight(w, scale),
                                                                                     scale))


@pytest.mark.parametrize("gated", [False, True])
def test_token_wise_loss_in_integers_matches_the_fake_quantized_float_loss(gated):
    """combine: the group's linears computed as the int8 kernel does; the same loss as the float fake-quantized
    matmul (to float32 rounding), for every grid point, and the same pick."""
    base = outlier_problem(gated=gated, tokens=200, channels=64, outs=(48, 48))
    if gated:
        combine = lambda ys: torch.nn.functional.silu(ys[0]) * ys[1]  # noqa: E731
    else:
        combine = lambda ys: torch.cat(ys, dim=-1)  # noqa: E731
    x = torch.cat(base.x)
    base = smooth.dataclasses.replace(base, x=[x], rowwise=True)
    p = smooth.shifted(base, smooth.m2_shift(base.ch_min, base.ch_max))
    fast = smooth.dataclasses.replace(p, combine=combine)
    want = smooth.target(p)
    r = torch.maximum(p.ch_max, -p.ch_min).double()
    grid = smooth.m2_grid(r, 40)
    plain = [smooth.loss(p, want, smooth.m2_scale(r, float(t))) for t in grid]
    kernel = [smooth.loss(fast, want, smooth.m2_scale(r, float(t))) for t in grid]
    assert kernel == pytest.approx(plain, rel=1e-5)
    assert kernel != plain  # a different computation, not the float path again
    assert torch.equal(smooth.m2_search(fast, n=40)[0], smooth.m2_search(p, n=40)[0])


def test_attention_loss_in_integers_matches_the_fake_quantized_float_loss(tiny_model, calib_dir, monkeypatch):
    """Attention groups (a real vision block's and decoder layer's, from an m2 calibration): the projections
    computed by the integer kernel and handed to the live attention module give the fake-quantized float loss to
    float32 rounding, on the proxy's windows and on all of them, and the same pick."""
    captured = []
    real = smooth.m2_search

    def spy(p, *args, **kwargs):
        if p.attend is not None:
            captured.append(p)
        return real(p, *args, **kwargs)

    monkeypatch.setattr(smooth, "m2_search", spy)
    samples = calib_data.load_samples(calib_dir, tiny_model, limit=2)
    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(tiny_model))
    skeleton = qwen2vl.build_skeleton(qwen2vl.load_hf_config(tiny_model, False), torch.bfloat16)
    calibrate.calibrate(one_rank(skeleton, Checkpoint(tiny_model), arch, "histogram", "m2"), samples, len(samples))
    assert len(captured) == arch.vision_depth + arch.num_layers
    monkeypatch.setattr(smooth, "PROXY_WINDOW_TOKENS", 100)  # a proxy of one window of the two
    for p in (captured[0], captured[-1]):  # vision block 0, the last decoder layer
        plain = smooth.dataclasses.replace(p, attend=None, windows=lambda keep, p=p: (p.windows(keep)[0], None))
        want = smooth.target(p)
        r = torch.maximum(p.ch_max, -p.ch_min).double()
        scales = [smooth.m2_scale(r, float(t)) for t in smooth.m2_grid(r, 12)]
        kernel = [smooth.loss(p, want, s) for s in scales]
        # float32 rounding through softmax: within 1e-4 relative (measured: up to 1.02e-5 under transformers 4.46)
        assert kernel == pytest.approx([smooth.loss(plain, want, s) for s in scales], rel=1e-4)
        assert kernel != [smooth.loss(plain, want, s) for s in scales]  # not the float path again
        assert len(set(kernel)) > 6
        q, q_plain = smooth.proxy(p), smooth.proxy(plain)
        assert q.attend is not None and q.tokens < p.tokens
        q_want = smooth.target(q)
        assert [smooth.loss(q, q_want, s) for s in scales] == pytest.approx(
            [smooth.loss(q_plain, q_want, s) for s in scales], rel=1e-4)
        assert torch.equal(real(p, n=12)[0], real(plain, n=12)[0])


def test_token_wise_outputs_in_blocks_of_tokens_give_the_whole_reservoir_loss(monkeypatch):
    """Token-wise groups are computed BLOCK_TOKENS tokens at a time (memory follows the block): the same target,
    losses and pick as one block of every token, with a partial last block."""
    base = outlier_problem(gated=True, tokens=200, channels=64, outs=(48, 48))
    p = smooth.dataclasses.replace(base, x=[torch.cat(base.x)], rowwise=True,
                                   combine=lambda ys: torch.nn.functional.silu(ys[0]) * ys[1])
    r = torch.maximum(p.ch_max, -p.ch_min).double()
    scales = [smooth.m2_scale(r, float(t)) for t in smooth.m2_grid(r, 40)]

    def run(block):
        monkeypatch.setattr(smooth, "BLOCK_TOKENS", block)
        want = smooth.target(p)
        return want, [smooth.loss(p, want, s) for s in scales], smooth.m2_search(p, n=40)[0]

    whole, blocked = run(10**9), run(37)  # 200 tokens: 5 blocks of 37 and one of 15
    torch.testing.assert_close(blocked[0][0], whole[0][0], rtol=1e-6, atol=1e-6)
    assert blocked[1] == pytest.approx(whole[1], rel=1e-6)
    assert len(set(whole[1])) > 10  # the grid points differ: the comparison is not of one number
    assert torch.equal(blocked[2], whole[2])


def test_kernel_is_the_integer_kernel():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(33, 40, generator=g) * 3
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    scale, offset = int8.act_qparams(float(x.min()), float(x.max()))
    codes = int8.quantize_act(x, scale, offset).to(torch.int8)
    ws = int8.weight_scale(w)
    wq = int8.quantize_weight(w, ws)
    exact = ((codes.double() - float(offset)) @ wq.double().T) * (scale.double() * ws.double().reshape(1, -1))
    got = int8.Kernel.of(scale, offset, wq, ws, b)(codes)
    torch.testing.assert_close(got.double(), exact + b.double(), rtol=1e-6, atol=1e-6)
    assert torch.equal(int8.int_matmul(codes, wq), (codes.long() @ wq.long().T).int())
