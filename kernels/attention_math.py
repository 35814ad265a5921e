"""The tile math every attention kernel here shares: a dot product, and one online-softmax step.

`dot` wraps tl.dot for one quirk: Triton's CPU interpreter (3.8) returns garbage for bf16 operands,
so under TRITON_INTERPRET the launchers ask for DOT_PRECISION="upcast" with bf16 inputs and the
operands go to fp32 first. That is exact: a bf16 x bf16 product fits in fp32, and the GPU's
tensor cores accumulate in fp32 too.

The online softmax:

Flash attention never holds a whole row of scores. For each query row it keeps the running max
`row_max` (in log2 units), the running sum of exponentials `row_sum` and the unnormalised output
`acc`; each new tile of keys rescales the old state by exp2(old_max - new_max) and adds its own
contribution. At the end, output = acc / row_sum.

Scores arrive raw (q . k, -inf where masked); multiplying by qk_scale = softmax_scale * log2(e)
inside the exponent makes exp2 replace exp and lets the scale and the max subtraction fuse into
one FMA per score.
A row whose scores are all -inf so far (no visible key yet) keeps row_max = -inf; `safe_max`
avoids the NaN of (-inf) - (-inf) and leaves such rows at acc = 0, row_sum = 0.
"""

import triton
import triton.language as tl

LOG2_E = 1.4426950408889634  # log2(e): launchers pass qk_scale = softmax_scale * LOG2_E


@triton.jit
def dot(
    a,  # [M, K]
    b,  # [K, N]
    acc,  # [M, N] fp32 accumulator, or None
    DOT_PRECISION: tl.constexpr,  # "ieee" (fp32 inputs), "tf32" (fp16/bf16: native) or "upcast" (see above)
):
    if DOT_PRECISION == "upcast":
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        result = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return result


@triton.jit
def online_softmax_step(
    acc,  # [M, D] fp32, unnormalised output so far
    row_max,  # [M] fp32, running max of the scores (log2 units), -inf before any visible key
    row_sum,  # [M] fp32, running sum of exp2(score - row_max)
    scores,  # [M, N] fp32, this tile's raw scores q . k, -inf where masked
    v,  # [N, D] this tile's values (input dtype)
    qk_scale,  # softmax scale * log2(e), > 0
    DOT_PRECISION: tl.constexpr,  # see dot()
):
    new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)  # [M], log2 units
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # [M]
    p = tl.math.exp2(scores * qk_scale - safe_max[:, None])  # [M, N]
    correction = tl.math.exp2(row_max - safe_max)  # [M], 0 for a row that had no visible key
    row_sum = row_sum * correction + tl.sum(p, 1)
    acc = acc * correction[:, None]
    acc = dot(p.to(v.dtype), v, acc, DOT_PRECISION)  # [M, D]
    return acc, new_max, row_sum
