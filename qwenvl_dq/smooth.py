"""Anti-outlier smoothing: pure functions over tensors (no model, no I/O).

A smoothing group is a set of linears that read one input x [tokens, C] (a norm's output, or the attention output
for o_proj). Dividing input channel j by s_j and multiplying the linears' input column j by s_j leaves the float
output unchanged; the division is folded into whatever produces x (the norm's weight and bias, or v_proj's rows),
so no tensor is added. A channel shift z (m2, LayerNorm only) is folded the same way: x - z comes out of the norm
(its bias minus z) and each linear's bias gains W @ z.

Every search below scores a candidate by the group output error with the int8 quantization the product applies:

    loss(s) = sum over tokens and output channels of (f(Q_a(x / s), Q_w(W * s)) - f(x, W))^2 / tokens

where f is the group's output function (attention output for norm -> q,k,v; act(gate) * up for norm -> gate,up;
act(fc1) for the vision norm2 -> fc1; the linear itself for v -> o), Q_w is per-output-channel symmetric int8
(absmax / 127) and Q_a is per-tensor int8 (asymmetric, or symmetric with --act_symmetric) over the exact range of
x / s seen in calibration (per-channel min/max over every token / s). x is the group's token reservoir: windows of
every calibration sample, not one sample.
Each quantized linear is computed as the W8A8 kernel does it, in integers:
(Q_a codes - offset) @ Q_w codes^T times input_scale * weight_scale (int8.Kernel; an int8 GEMM on cpu),
for token-wise outputs BLOCK_TOKENS tokens at a time, so a search's memory follows the block, not the reservoir;
for attention the projections' outputs are handed to the live attention module in place of its linears.

Scoring every candidate on the whole reservoir is most of a run's time, so each search scores its candidates in two
steps (_pick). First every candidate is scored on a proxy of the group: a fixed, evenly spread subset of at most
PROXY_TOKENS tokens (PROXY_WINDOW_TOKENS, in whole windows, for attention) and, for token-wise outputs, of at most
PROXY_ROWS output rows of each linear. Its loss is an exact partial sum of the full one: a row's int8 weight
depends on that row alone, and the activation range always comes from every token's exact range. Then the FINALISTS
best of them, and the unsmoothed candidate, are scored on the whole group, and the lowest of those wins. A group no
larger than the proxy is scored whole, candidate by candidate.

m2, Outlier Suppression+ (Wei et al. 2023) as msModelSlim applies it to Qwen2-VL, with all samples:
    shift (LayerNorm groups only): z_j = (max_j + min_j) / 2 over every calibration token;
    range r_j = max(max_j - z_j, z_j - min_j);
    candidates t on a geometric grid of M2_GRID points from max_j r_j (s = 1: no smoothing) down to min_j r_j
    (below it every channel is scaled in proportion, which quantizes the same);
    s_j(t) = max(1, r_j / t); the first t with the lowest loss wins (of the finalists, for a large group).
m4, iterative SmoothQuant migration (real here; msModelSlim 26.1.0's m4 changes nothing on Qwen2-VL):
    repeat up to M4_ROUNDS times on the already-smoothed group:
        a_j = max |x_j| (exact, over every token), w_j = max over the group's rows of |W[:, j]|;
        s_j(alpha) = max(a_j^alpha / w_j^(1 - alpha), 1e-5) for alpha in M4_ALPHAS;
        take the alpha with the lowest loss (of the finalists); apply it if that loss is below the current one,
        else stop.
    The result is the product of the applied s. Channels tied together (grouped-query heads for v -> o: every
    query head of one kv head shares v's rows) are reduced to one factor per tie by max before the formula.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from . import int8

M2_GRID = 100
M4_ALPHAS = tuple(i / 20 for i in range(21))
M4_ROUNDS = 5
SCALE_FLOOR = 1e-5
PROXY_TOKENS = 512  # token-wise outputs
PROXY_WINDOW_TOKENS = 256  # attention: whole windows, each a sequence with every head
PROXY_ROWS = 256
FINALISTS = 2
BLOCK_TOKENS = 512  # token-wise outputs are computed this many tokens at a time: a search's memory follows it

# result keys (suffixes of a module prefix) and what they fold into
NORM_SCALE, NORM_SHIFT = "smooth_scale", "smooth_shift"  # norm: weight / s, (bias - z) / s
IN_SCALE, IN_SHIFT = "smooth_in_scale", "smooth_in_shift"  # linear: W[:, j] * s_j, bias + W @ z
OUT_SCALE = "smooth_out_scale"  # linear: W[i, :] / s_i, bias_i / s_i
KEYS = (NORM_SCALE, NORM_SHIFT, IN_SCALE, IN_SHIFT, OUT_SCALE)

Output = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor | None]],
                  list[torch.Tensor]]


@dataclasses.dataclass
class Problem:
    """One smoothing group: float32 throughout.

    x: the reservoir windows of the input, each [tokens, C]; ch_min/ch_max: exact per-channel range over every
    calibration token [C]; weights/biases: the group's linears ([out_i, C], [out_i] or None); output(xs, ws, bs)
    gives the group output; tie: [C] channel -> factor index, or None for one factor per channel.
    rowwise: output row i depends on row i of each linear only (token-wise outputs: its rows may be subset);
    windows(keep): attention, (output, attend) of windows `keep` alone (its windows may be subset).
    combine(ys): token-wise groups, the output from each linear's output; with it the quantized outputs are
    computed as the integer kernel does (int8.Kernel: exact integer products, several times faster on cpu
    than the float32 matmul of the fake-quantized operands, the same numbers to float32 rounding).
    attend(codes, linears): attention groups, the outputs `output` gives from the windows' int8 activation codes
    with each linear replaced by a function of its input (the kernel's)."""

    x: list[torch.Tensor]
    ch_min: torch.Tensor
    ch_max: torch.Tensor
    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    output: Output
    tie: torch.Tensor | None = None
    rowwise: bool = False
    windows: Callable[[list[int]], tuple[Output, Callable | None]] | None = None
    act_symmetric: bool = False  # the activation quantizer the product saves (--act_symmetric)
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
    attend: Callable[[list[torch.Tensor], list[Callable]], list[torch.Tensor]] | None = None

    @property
    def tokens(self) -> int:
        return sum(x.shape[0] for x in self.x)


def m2_shift(ch_min: torch.Tensor, ch_max: torch.Tensor) -> torch.Tensor:
    """Per-channel shift that centres every channel's range on zero."""
    return (ch_max + ch_min) / 2


def shifted(p: Problem, z: torch.Tensor) -> Problem:
    """The same group with z subtracted from its input and W @ z added to every bias (same float output)."""
    biases = []
    for w, b in zip(p.weights, p.biases):
        if b is None:
            raise ValueError("a channel shift needs every linear of the group to have a bias")
        biases.append(b + w @ z)
    return dataclasses.replace(p, x=[x - z for x in p.x], ch_min=p.ch_min - z, ch_max=p.ch_max - z, biases=biases)


def scaled(p: Problem, s: torch.Tensor) -> Problem:
    """The same group with its input divided by s and its linears' input columns multiplied by s."""
    return dataclasses.replace(p, x=[x / s for x in p.x], ch_min=p.ch_min / s, ch_max=p.ch_max / s,
                               weights=[w * s for w in p.weights])


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 round trip, as the saved int8 weight and weight_scale give it."""
    scale = int8.weight_scale(w)
    return (w / scale).round_().clamp_(-int8.WMAX, int8.WMAX).mul_(scale)


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x.split(BLOCK_TOKENS)


def target(p: Problem) -> list[torch.Tensor]:
    """The float group output the searches aim at (token-wise outputs block by block)."""
    if p.combine is None:
        return p.output(p.x, p.weights, p.biases)
    return [torch.cat([p.output([b], p.weights, p.biases)[0] for b in _blocks(x)]) for x in p.x]


def _error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Sum of squared differences, accumulated in float64."""
    return sum(float(torch.sub(g, t).square_().sum(dtype=torch.float64)) for g, t in zip(got, want))


def loss(p: Problem, want: list[torch.Tensor], s: torch.Tensor) -> float:
    """Quantized group output error with input channels divided by s (see the module docstring)."""
    lo, hi = float((p.ch_min / s).min()), float((p.ch_max / s).max())
    a_scale, a_offset = int8.act_qparams(lo, hi, p.act_symmetric)
    if p.combine is not None or p.attend is not None:  # each linear as the integer kernel computes it
        kernels = []
        for w, b in zip(p.weights, p.biases):
            w = w * s
            sc = int8.weight_scale(w)
            kernels.append(int8.Kernel.of(a_scale, a_offset, int8.quantize_weight(w, sc), sc, b))
        if p.attend is not None:
            codes = [int8.quantize_act(x / s, a_scale, a_offset).to(torch.int8) for x in p.x]
            return _error(p.attend(codes, kernels), want) / max(1, p.tokens)
        err = 0.0
        for x, t in zip(p.x, want):  # block by block: the outputs of a block of tokens at a time
            for xb, tb in zip(_blocks(x), _blocks(t)):
                c = int8.quantize_act(xb / s, a_scale, a_offset).to(torch.int8)
                err += _error([p.combine([k(c) for k in kernels])], [tb])
        return err / max(1, p.tokens)
    xs = [int8.fake_quant_act(x / s, a_scale, a_offset) for x in p.x]
    ws = [fake_quant_weight(w * s) for w in p.weights]
    return _error(p.output(xs, ws, p.biases), want) / max(1, p.tokens)


def _spread(n: int, k: int) -> torch.Tensor:
    """k distinct indices spread evenly over range(n) (k <= n)."""
    return torch.arange(k) * n // k


def proxy(p: Problem) -> Problem:
    """The group cut down to at most PROXY_TOKENS tokens (PROXY_WINDOW_TOKENS for attention) and, for row-wise
    outputs, PROXY_ROWS rows per linear;
    p itself when it is no larger. The per-channel range (hence the activation quantizer) stays the full one."""
    q = p
    if p.rowwise:
        rows = p.weights[0].shape[0]
        if rows > PROXY_ROWS and all(w.shape[0] == rows for w in p.weights):
            keep = _spread(rows, PROXY_ROWS)
            q = dataclasses.replace(q, weights=[w[keep] for w in q.weights],
                                    biases=[None if b is None else b[keep] for b in q.biases])
        if q.tokens > PROXY_TOKENS:
            x = torch.cat(q.x)
            q = dataclasses.replace(q, x=[x[_spread(x.shape[0], PROXY_TOKENS)]])
    elif p.windows is not None and p.tokens > PROXY_WINDOW_TOKENS and len(p.x) > 1:
        k = max(1, round(len(p.x) * PROXY_WINDOW_TOKENS / p.tokens))
        keep = _spread(len(p.x), k).tolist()
        output, attend = p.windows(keep)
        q = dataclasses.replace(q, x=[p.x[i] for i in keep], output=output, attend=attend, windows=None)
    return q


def _pick(p: Problem, candidates: list[torch.Tensor], always: int | None = None,
          want: list[torch.Tensor] | None = None) -> tuple[int, list[float], dict[int, float]]:
    """The candidate (index) with the lowest loss on p, found in two steps (module docstring): returns (index,
    every candidate's score (the proxy's loss, or p's when p is the proxy), {finalist: p's loss}). `always` is
    a candidate that is always a finalist; ties go to the lower index."""
    q = proxy(p)
    want = target(p) if want is None else want
    if q is p:
        scores = [loss(p, want, s) for s in candidates]
        full = dict(enumerate(scores))
    else:
        q_want = target(q)
        scores = [loss(q, q_want, s) for s in candidates]
        order = sorted(range(len(candidates)), key=lambda i: (scores[i], i))
        finalists = set(order[:FINALISTS]) | ({always} if always is not None else set())
        full = {i: loss(p, want, candidates[i]) for i in sorted(finalists)}
    best = min(full, key=lambda i: (full[i], i))
    return best, scores, full


def _per_factor(v: torch.Tensor, tie: torch.Tensor | None) -> torch.Tensor:
    """Reduce per-channel values to one per tie group (max); identity without ties."""
    if tie is None:
        return v
    out = torch.full((int(tie.max()) + 1,), float("-inf"), dtype=v.dtype)
    return out.scatter_reduce(0, tie, v, reduce="amax")


def _expand(f: torch.Tensor, tie: torch.Tensor | None) -> torch.Tensor:
    return f if tie is None else f[tie]


def m2_grid(r: torch.Tensor, n: int = M2_GRID) -> torch.Tensor:
    """Thresholds, largest first: geometric from max(r) down to min(r) over channels with a non-zero range."""
    live = r[r > 0]
    if live.numel() == 0:
        return torch.ones(1, dtype=torch.float64)
    hi, lo = float(live.max()), float(live.min())
    lo = min(hi, max(lo, hi * 1e-6))
    return torch.logspace(torch.log10(torch.tensor(hi)), torch.log10(torch.tensor(lo)), n, dtype=torch.float64)


def m2_scale(r: torch.Tensor, t: float) -> torch.Tensor:
    return (r / t).clamp_min(1.0).float()


def m2_search(p: Problem, n: int = M2_GRID) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """OS+ scale search on an (already shifted) group: returns (s [C], the score of every grid point (_pick),
    grid)."""
    r = torch.maximum(p.ch_max, -p.ch_min).double()
    r = _per_factor(r, p.tie)
    grid = m2_grid(r, n)
    candidates = [_expand(m2_scale(r, float(t)), p.tie) for t in grid]
    best, scores, _ = _pick(p, candidates, always=0)  # grid[0]: no smoothing
    return candidates[best], scores, grid


def m4_candidate(a: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant migration factor per channel: a^alpha / w^(1 - alpha), floored."""
    a, w = a.double().clamp_min(SCALE_FLOOR), w.double().clamp_min(SCALE_FLOOR)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp_min(SCALE_FLOOR).float()


def m4_search(p: Problem, alphas: Sequence[float] = M4_ALPHAS,
              rounds: int = M4_ROUNDS) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """Iterative smooth: returns (s [C], [(alpha, loss) of each applied round])."""
    want = target(p)  # smoothing leaves the float output as it is: one target for every round
    total = torch.ones_like(p.ch_max)
    current = loss(p, want, total)
    history = []
    for _ in range(rounds):
        a = _per_factor(torch.maximum(p.ch_max, -p.ch_min), p.tie)
        w = _per_factor(torch.stack([x.abs().amax(dim=0) for x in p.weights]).amax(dim=0), p.tie)
        candidates = [_expand(m4_candidate(a, w, al), p.tie) for al in alphas]
        best, _, full = _pick(p, candidates, want=want)
        if not full[best] < current:
            break
        p = scaled(p, candidates[best])
        total = total * candidates[best]
        current = full[best]
        history.append((alphas[best], full[best]))
    return total, history


# --- folding the factors into saved tensors ------------------------------------------------------------------


def fold_norm(weight: torch.Tensor, bias: torch.Tensor | None, factors: dict[str, torch.Tensor]):
    """A norm's (weight, bias) with its output divided by s after subtracting z; float32 results."""
    w = weight.float()
    b = None if bias is None else bias.float()
    z, s = factors.get(NORM_SHIFT), factors.get(NORM_SCALE)
    if z is not None:
        if b is None:
            raise ValueError("a shift needs a norm with a bias")
        b = b - z
    if s is not None:
        w = w / s
        b = None if b is None else b / s
    return w, b


def fold_linear(weight: torch.Tensor, bias: torch.Tensor | None, factors: dict[str, torch.Tensor]):
    """A linear's (weight, bias) for an input shifted by z and divided by s, and output rows divided by r:
    W' = diag(1/r) W diag(s), b' = (b + W z) / r; float32 results."""
    w = weight.float()
    b = None if bias is None else bias.float()
    z, s, r = factors.get(IN_SHIFT), factors.get(IN_SCALE), factors.get(OUT_SCALE)
    if z is not None:
        if b is None:
            raise ValueError("a shift needs a linear with a bias")
        b = b + w @ z
    if s is not None:
        w = w * s
    if r is not None:
        w = w / r[:, None]
        b = None if b is None else b / r
    return w, b


def fold(params: dict[str, torch.Tensor], factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"weight", ["bias"]} of one module -> the same names, smoothed: computed in float32 and rounded once to each
    tensor's own dtype (the one rule calibration runs with and the merge saves). factors: this module's
    {key: tensor} (keys from KEYS, without the module prefix); none leaves the tensors as they are."""
    if not factors:
        return dict(params)
    norm = NORM_SCALE in factors or NORM_SHIFT in factors
    w, b = (fold_norm if norm else fold_linear)(params["weight"], params.get("bias"), factors)
    out = {"weight": w} if b is None else {"weight": w, "bias": b}
    return {k: v.to(params[k].dtype) for k, v in out.items()}


def module_factors(results: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The smoothing factors recorded for the module at checkpoint `prefix` (e.g. 'model.layers.0.input_layernorm')."""
    return {k: results[f"{prefix}.{k}"] for k in KEYS if f"{prefix}.{k}" in results}
