"""int8 primitives against plain-Python references (torchao's habit)."""

import math
import struct

import torch

from qwenvl_dq import int8


def py_round(x):  # round half to even, as torch.round
    return float(round(x))


def test_weight_quant_matches_python_reference_and_is_within_half_step():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 13, generator=g) * torch.linspace(0.01, 3, 7)[:, None]
    w[3, 5] = 9.0  # one big value in a row
    scale = int8.weight_scale(w)
    wq = int8.quantize_weight(w, scale, block_rows=3)
    assert wq.dtype == torch.int8 and scale.shape == (7, 1)
    for r in range(7):
        s = max(abs(v) for v in w[r].tolist()) / 127
        assert math.isclose(float(scale[r, 0]), s, rel_tol=1e-6)
        for c in range(13):
            ref = max(-127, min(127, py_round(float(w[r, c]) / float(scale[r, 0]))))
            assert int(wq[r, c]) == ref
    err = (int8.dequantize_weight(wq, scale) - w).abs()
    assert bool((err <= scale / 2 + 1e-7).all())
    assert int(wq.abs().max()) == 127 and int(wq.min()) >= -127


def test_zero_row_gets_tiny_scale_and_zero_ints():
    w = torch.zeros(2, 4)
    w[1] = torch.tensor([1.0, -2.0, 0.5, 0.0])
    scale = int8.weight_scale(w)
    wq = int8.quantize_weight(w, scale)
    assert wq[0].tolist() == [0, 0, 0, 0]
    assert wq[1].tolist() == [64, -127, 32, 0]


def test_act_qparams_cover_range_with_integer_zero_point():
    scale, offset = int8.act_qparams(-1.5, 6.0)
    assert math.isclose(float(scale), 7.5 / 255, rel_tol=1e-6)
    assert float(offset) == -128 - round(-1.5 / (7.5 / 255))  # == -77
    assert float(offset) == -77.0
    # range not holding 0 is widened to hold it: 0 is exactly representable
    s2, o2 = int8.act_qparams(2.0, 5.0)
    assert float(o2) == -128.0 and math.isclose(float(s2), 5.0 / 255, rel_tol=1e-6)
    assert float(int8.fake_quant_act(torch.zeros(1), s2, o2)) == 0.0


def test_activation_fake_quant_round_trips_within_one_step():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 16, generator=g) * 3 + 0.7
    scale, offset = int8.act_qparams(float(x.min()), float(x.max()))
    err = (int8.fake_quant_act(x, scale, offset) - x).abs()
    assert float(err.max()) <= float(scale) * 1.0 + 1e-6
    q = int8.quantize_act(x, scale, offset)
    assert float(q.min()) >= -128 and float(q.max()) <= 127
    # the offset is added before rounding (msModelSlim's order): with an odd offset ties go the other way
    s1, o1 = torch.tensor([1.0]), torch.tensor([3.0])
    assert int8.quantize_act(torch.tensor([0.5, 1.5, -0.5]), s1, o1).tolist() == [4.0, 4.0, 2.0]


def test_deq_scale_and_quant_bias_follow_spec_formulas():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 8, generator=g)
    bias = torch.randn(5, generator=g)
    ws = int8.weight_scale(w)
    wq = int8.quantize_weight(w, ws)
    iscale, ioff = torch.tensor([0.05]), torch.tensor([9.0])
    deq = int8.deq_scale(iscale, ws)
    assert deq.dtype == torch.float32 and deq.shape == (5,)
    for n in range(5):
        assert float(deq[n]) == float(torch.tensor(0.05, dtype=torch.float32) * ws[n, 0])
    qb = int8.quant_bias(bias, deq, ioff, wq)
    assert qb.dtype == torch.int32
    for n in range(5):
        rowsum = sum(int(v) for v in wq[n].tolist())
        ref = round(float(bias[n]) / float(deq[n]) - 9.0 * rowsum)
        assert int(qb[n]) == ref
    # without a bias: only the zero-point correction
    assert int8.quant_bias(None, deq, ioff, wq).tolist() == [-9 * int(r) for r in wq.to(torch.int64).sum(1)]


def test_integer_kernel_equals_float_math_on_quantized_values():
    """y = (x_q @ Wq^T + quant_bias) * deq_scale equals fake-quant x times dequantized W plus bias
    (to the rounding of the bias)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 32, generator=g) * 2 + 0.5
    w = torch.randn(10, 32, generator=g) * 0.1
    bias = torch.randn(10, generator=g) * 0.1
    ws = int8.weight_scale(w)
    wq = int8.quantize_weight(w, ws)
    s, o = int8.act_qparams(float(x.min()), float(x.max()))
    deq = int8.deq_scale(s, ws)
    y = int8.w8a8_linear(x, wq, int8.quant_bias(bias, deq, o, wq), deq, s, o)
    ref = int8.fake_quant_act(x, s, o).double() @ int8.dequantize_weight(wq, ws).double().T + bias.double()
    assert float((y.double() - ref).abs().max()) <= float(deq.max()) * 0.5 + 1e-6


def test_fp16_models_store_deq_scale_as_int64_bits():
    deq = torch.tensor([0.001, 1.5, 3.0e-5], dtype=torch.float32)
    out = int8.deq_scale_for_dtype(deq, torch.float16)
    assert out.dtype == torch.int64
    for v, bits in zip(deq.tolist(), out.tolist()):
        assert bits == struct.unpack("<i", struct.pack("<f", v))[0]
    assert int8.deq_scale_for_dtype(deq, torch.bfloat16).dtype == torch.float32


def test_row_sums_and_weight_scale_match_the_plain_computations_exactly():
    g = torch.Generator().manual_seed(3)
    for cols in (1000, 140_000):  # the float32 block path, and rows too long for it (int64)
        wq = torch.randint(-128, 128, (5, cols), generator=g, dtype=torch.int8)
        wq[0] = -128  # the largest magnitude a row can sum to
        wq[1] = 127
        assert torch.equal(int8.row_sums(wq), wq.to(torch.int64).sum(dim=1))
    assert int(int8.row_sums(torch.full((2, 1000), -128, dtype=torch.int8))[0]) == -128_000
    w = torch.randn(300, 700, generator=g).to(torch.bfloat16)
    w[7] = -w[7].abs()  # a row whose absmax is its minimum
    w[9] = 0  # an all-zero row: the floor
    plain = (w.float().abs().amax(dim=1, keepdim=True) / int8.WMAX).clamp_min(int8._EPS)
    assert torch.equal(int8.weight_scale(w), plain) and float(int8.weight_scale(w)[9, 0]) == int8._EPS
