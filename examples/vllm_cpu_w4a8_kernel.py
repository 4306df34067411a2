"""What vLLM-CPU's W4A8 kernel does to the activations, measured on torch's op (no vLLM needed).

    python examples/vllm_cpu_w4a8_kernel.py

vLLM serves a compressed-tensors W4A8 checkpoint (int4 weights, ``input_activations`` int8 per
token, dynamic, symmetric) with its ``CompressedTensorsW4A8Int`` scheme, which on a CPU runs
``Dynamic4bitLinearKernel``: ``torch.ops.aten._dyn_quant_pack_4bit_weight`` once, then
``torch.ops.aten._dyn_quant_matmul_4bit`` (read from vLLM's source; KleidiAI on Arm, torch's
reference kernel on x86). This script calls the same two torch ops on random int4 weights and
compares the output with three emulations of the activations: unquantized, symmetric int8 per token
(``absmax / 127``, orthoopt's grid) and asymmetric int8 per token (``(max - min) / 255`` with a zero
point). The smallest deviation says which one the kernel runs. Group scales are passed in bfloat16,
as vLLM does for grouped weights. Imports neither vLLM nor orthoopt.
"""

from __future__ import annotations

import torch


def main() -> None:
    torch.manual_seed(0)
    k, n, m, g = 256, 64, 8, 32
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scales = (torch.rand(n, k // g) * 0.1 + 0.01).to(torch.bfloat16)
    shifted = q.add(8)
    packed = (shifted[:, 1::2] << 4 | shifted[:, ::2]).to(torch.uint8)  # as vLLM's process_weights_after_loading
    w = torch.ops.aten._dyn_quant_pack_4bit_weight(packed, scales, None, g, k, n)
    x = torch.randn(m, k)
    x[:, 3] += 6.0  # an outlier channel, so that the grids differ visibly
    y = torch.ops.aten._dyn_quant_matmul_4bit(x, w, g, k, n)
    dense = q.float() * scales.float().repeat_interleave(g, 1)

    def symmetric(v):
        s = v.abs().amax(1, keepdim=True) / 127
        return (v / s).round().clamp(-127, 127) * s

    def asymmetric(v):
        lo, hi = v.amin(1, keepdim=True).clamp(max=0), v.amax(1, keepdim=True).clamp(min=0)
        s = (hi - lo) / 255
        z = (-128 - lo / s).round()
        return ((v / s).round() + z).clamp(-128, 127).sub(z) * s

    top = y.abs().max().item()
    for name, f in (("unquantized", lambda v: v), ("symmetric int8 (absmax/127)", symmetric),
                    ("asymmetric int8 ((max-min)/255)", asymmetric)):
        err = (f(x) @ dense.T - y).abs().max().item()
        print(f"{name:34s} max |kernel - emulation| = {err:.3g}  ({err / top:.2e} of max |y|)")
    print(f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
