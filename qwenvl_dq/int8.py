"""int8 primitives, pure functions over tensors: choose_qparams / quantize / dequantize, and the W8A8 kernel terms.

Weights: symmetric per output channel, scale = absmax / 127, values in [-127, 127].
Activations: static per tensor, asymmetric, x_q = clamp(round(x / scale + offset), -128, 127), integer offset
(the offset is added before rounding, as msModelSlim does; with an integer offset this is round(x / scale) + offset,
compressed-tensors' and vLLM's x_q = round(x / scale) + zero_point, so input_zero_point = input_offset).
Symmetric activations (--act_symmetric): offset 0 and scale = max(|min|, |max|) / 127, so the range maps onto
-127..127 as the weights do; the kernels still clamp to -128..127 (vLLM's static scaled_int8_quant, compressed-
tensors' fake quantization, MindIE), so -128 only ever holds a value beyond the calibrated range.
The integer kernel the saved tensors imply: y = (x_q @ Wq^T + quant_bias) * deq_scale, where
deq_scale = input_scale * weight_scale and quant_bias = round(bias / deq_scale - input_offset * sum_k Wq[n, k]).

Where msModelSlim rounds through bf16 (it divides W by the scale in bf16, and multiplies the two bf16 scales in
bf16 for deq_scale), ours stays in float32: the int8 weight is round(W / s) with s the saved scale, and deq_scale is
the exact product of the saved scales (two bf16 values multiply exactly in float32). The integer kernel then
reproduces W and the activation grid as saved, with no extra rounding.
"""

from __future__ import annotations

import dataclasses

import torch

QMIN, QMAX = -128, 127
WMAX = 127
_EPS = torch.finfo(torch.float32).eps  # the reference's floor for every scale
# a block of rows at a time in weight quantization: its float32 temporaries (2 MiB) stay under the allocator's mmap
# threshold and near the cache (a 4096 x 4096 bf16 weight: 16.7 ms in blocks of 512 rows, 5.3 ms in 128)
BLOCK_ELEMENTS = 1 << 19


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """w: [out, in] -> scale [out, 1] float32, absmax of each output channel / 127 (tiny for all-zero rows). The
    absmax is max(max, -min) in w's own dtype (exact, and no float32 copy of w)."""
    absmax = torch.maximum(w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True).neg())
    return (absmax.float() / WMAX).clamp_min(_EPS)


def _rows_per_block(w: torch.Tensor) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, block_rows: int | None = None) -> torch.Tensor:
    """w: [out, in], scale: [out, 1] -> int8 [out, in], round-half-even(w / scale) clamped to [-127, 127].

    Works in blocks of rows (default BLOCK_ELEMENTS elements each), so a large matrix needs no full float32 copy."""
    out = torch.empty(w.shape, dtype=torch.int8)
    step = block_rows or _rows_per_block(w)
    for r in range(0, w.shape[0], step):
        blk = torch.div(w[r:r + step].float(), scale[r:r + step])
        out[r:r + step] = blk.round_().clamp_(-WMAX, WMAX).to(torch.int8)
    return out


def row_sums(wq: torch.Tensor) -> torch.Tensor:
    """int64 [out], the sum of each row of an int8 [out, in]: block by block in float32, which is exact while
    |sum| <= 128 * in < 2**24 (rows of fewer than 131072 columns); longer rows are summed in int64."""
    if wq.shape[1] * (QMAX + 1) >= 1 << 24:
        return wq.sum(dim=1, dtype=torch.int64)
    step = _rows_per_block(wq)
    return torch.cat([wq[r:r + step].float().sum(dim=1) for r in range(0, wq.shape[0], step)]).to(torch.int64)


def dequantize_weight(wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """wq: int8 [out, in], scale: [out, 1] -> float32 [out, in]."""
    return wq.float() * scale.float()


def act_qparams(lo: float, hi: float, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor int8 qparams covering [lo, hi] (widened to hold 0, so zero is exact). Asymmetric: 256 levels over
    the range; symmetric: scale = max(|lo|, |hi|) / 127, offset 0.

    Returns (scale [1] float32, offset [1] float32 holding an integer in [-128, 127])."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        scale = max(max(-lo, hi) / WMAX, _EPS)
        return torch.tensor([scale], dtype=torch.float32), torch.zeros(1, dtype=torch.float32)
    scale = max((hi - lo) / (QMAX - QMIN), _EPS)
    offset = QMIN - round(lo / scale)
    offset = min(max(offset, QMIN), QMAX)
    return torch.tensor([scale], dtype=torch.float32), torch.tensor([float(offset)], dtype=torch.float32)


def quantize_act(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x: [..., in] float -> int8-valued float32 tensor, clamp(round(x / scale + offset), -128, 127)."""
    return (x.float() / scale.float()).add_(offset.float()).round_().clamp_(QMIN, QMAX)


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize: what the int8 kernel sees of x, in float32."""
    return (quantize_act(x, scale, offset) - offset.float()) * scale.float()


def int_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq: int8 [tokens, in], wq: int8 [out, in] -> xq @ wq^T, exact, int32 [tokens, out] (the integer kernel's
    accumulator). On cpu torch's int8 GEMM (several times float32's speed); elsewhere a float32 matmul of the codes,
    exact while a sum stays below 2^24."""
    if xq.device.type == "cpu":
        return torch._int_mm(xq, wq.T)
    return (xq.float() @ wq.float().T).round_().to(torch.int32)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One W8A8 linear as the integer kernel computes it, for the int8 weight wq [out, in]: kernel(xq) on the
    activation codes xq (int8 [..., in]) is (xq - offset) @ wq^T in integers, times input_scale * weight_scale
    (deq), plus the float bias; float32 [..., out]. The offset's term and the bias are one per-row constant, made
    once per weight (of) and reused for every block of codes. For codes from quantize_act with scale/offset and wq,
    w_scale from quantize_weight: the same numbers as linear(fake_quant_act(x), wq * w_scale, bias) up to float32
    rounding."""

    wq: torch.Tensor
    deq: torch.Tensor  # float32 [out]
    const: torch.Tensor  # float32 [out]: -offset * rowsum(wq) * deq + bias

    @classmethod
    def of(cls, scale: torch.Tensor, offset: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None) -> "Kernel":
        deq = deq_scale(scale, w_scale)
        const = -float(offset.reshape(-1)[0]) * wq.sum(dim=1, dtype=torch.int32).float() * deq
        return cls(wq, deq, const if bias is None else const + bias.float())

    def __call__(self, xq: torch.Tensor) -> torch.Tensor:
        y = torch.addcmul(self.const, int_matmul(xq.reshape(-1, xq.shape[-1]), self.wq).float(), self.deq)
        return y.reshape(*xq.shape[:-1], y.shape[-1])


def deq_scale(input_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """input_scale: [1], w_scale: [out, 1], both as saved -> float32 [out], their product in float32."""
    return (input_scale.float() * w_scale.float()).reshape(-1)


def quant_bias(bias: torch.Tensor | None, deq: torch.Tensor, input_offset: torch.Tensor,
               wq: torch.Tensor) -> torch.Tensor:
    """int32 [out] = round(bias / deq_scale - input_offset * sum_k Wq[n, k]); bias None counts as 0.

    The offset correction moves the zero point out of the integer matmul: x_q @ Wq^T - offset * rowsum(Wq)."""
    rowsum = row_sums(wq).double()
    corr = -float(input_offset.reshape(-1)[0]) * rowsum
    if bias is not None:
        corr = corr + bias.double() / deq.double()
    return corr.round().to(torch.int32)


def deq_scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Saved dtype of deq_scale: float32 for bf16 models; int64 otherwise (fp16: MindIE's layout)."""
    return torch.float32 if model_dtype == torch.bfloat16 else torch.int64


def deq_scale_for_dtype(deq: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    """deq_scale as saved: float32 for bf16 models; otherwise the float32 bits sign-extended into an int64."""
    if deq_scale_dtype(model_dtype) == torch.float32:
        return deq.float()
    return deq.float().contiguous().view(torch.int32).to(torch.int64)


def w8a8_linear(x: torch.Tensor, wq: torch.Tensor, qbias: torch.Tensor, deq: torch.Tensor,
                input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
    """Simulate the integer kernel exactly in float64: x: [..., in] -> y: [..., out] float32."""
    xq = quantize_act(x, input_scale, input_offset).double()
    acc = xq @ wq.double().T + qbias.double()
    return (acc * deq.double()).float()


def zero_point_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, input_scale: torch.Tensor,
                      zero_point: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """compressed-tensors' W8A8 linear (what vLLM's int8 kernels compute), simulated exactly in float64:
    x: [..., in] -> y: [..., out] float32, y = ((x_q - zp) @ Wq^T) * input_scale * w_scale + bias with
    x_q = clamp(round(x / input_scale) + zp, -128, 127). w_scale: [out, 1]; input_scale, zero_point: [1]."""
    zp = zero_point.double()
    xq = quantize_act(x, input_scale, zero_point).double() - zp
    y = (xq @ wq.double().T) * (input_scale.double() * w_scale.double().reshape(-1))
    if bias is not None:
        y = y + bias.double()
    return y.float()
