"""OptRot's data-free objective: the element-wise fourth power of the rotated weights.

Gadhikar, Grazzi & Hensman, "OptRot: Mitigating Weight Outliers via Data-Free Rotations for
Post-Training Quantization" (2025, arXiv:2512.24124). For every weight block next to a rotation
(``docs/conventions.md``: side "in" -> ``W @ R``, side "out" -> ``R.T @ W``)::

    L(R) = sum_blocks c_b * sum_ij (rotated W_b)_ij ** 4

with ``c_b = 1`` (the paper's plain sum, the default) or, with ``normalize=True``,
``c_b = numel(W_b) / ||W_b||_F ** 4`` so that each block's term is the entry kurtosis
``E[w^4] / E[w^2]^2`` of its rotated weight: at least 1 (equal magnitudes), 3 for Gaussian entries,
unchanged by ``W -> c * W``. The Frobenius norm is rotation invariant, so ``c_b`` is a constant.
See docs/objectives.md; speed, memory and the stochastic variant: docs/performance.md.

"""

from __future__ import annotations


import torch

from orthoopt.core.blocks import Rotations, WeightBlock, block_dims, get_rotation
from orthoopt.core.checks import check_finite_tensor
from orthoopt.errors import InvalidInputError
from orthoopt.utils.checks import check_device

from .base import Objective
from .row_segments import (
    FourthPowerKernel,
    RowPacker,
    RowSampler,
    accumulate_rows,
    check_chunk_rows,
    value_rows,
)


class FourthPower(Objective):
    """OptRot: ``sum_b c_b * sum((rotated W_b) ** 4)`` over weight blocks.

    blocks:    weight blocks (any number of rotations).
    normalize: ``False`` (default, the paper's plain sum, ``c_b = 1``) or ``True``
               (``c_b = numel / ||W_b||_F^4``: each block counts as its entry kurtosis, scale free).

    With a block's rows ``A = block.as_rows()`` (``[m, n]``, rotated as ``A @ R``) the gradient is
    ``dL/dR = 4 c_b A.T @ (A @ R) ** 3``: for side "in" ``4 W.T (W R)^3``, for side "out"
    ``4 W ((R.T W)^3).T``. :meth:`value_and_grad` uses this closed form (no autograd graph); the loss
    is accumulated in float64. :meth:`loss` is differentiable by autograd when a rotation requires
    grad, and otherwise takes the fast path below.

    Speed and memory (keyword-only; ``docs/performance.md`` has the measurements):

    fused:      ``True`` (default): at construction the rows of all blocks of each rotation are copied,
                in block order, into one ``[sum m_b, n]`` row matrix stored as segments of
                ``chunk_rows`` rows (:mod:`orthoopt.objectives.row_segments`), in
                ``promote(weight dtype, float32)`` on ``device``; a step is then two large products
                per segment. The copy costs the blocks' size in that dtype once
                (:attr:`packed_bytes`); in-place changes to the weights after construction are not seen
                by :meth:`value_and_grad` (only by the autograd path of :meth:`loss`, which reads the
                blocks). ``c_b`` is folded into the copy as ``c_b ** (1/4) * A_b``.
                ``False``: keep the blocks as views (no copy, follows in-place updates), two products
                per block (per ``chunk_rows`` rows of it); slower for many small blocks.
    chunk_rows: rows per segment, bounding the three ``[chunk_rows, n]`` work buffers of a step;
                default ``max(256, 2**22 // n)`` (16 MiB per float32 buffer).
    sample_fraction, seed: stochastic steps. With ``f < 1`` every :meth:`value_and_grad` call uses
                ``k = round(f m)`` rows of each segment (of each block chunk when ``fused=False``),
                drawn uniformly without replacement and weighed by ``m / k``: loss and gradient are
                unbiased estimates, at about ``f`` of the product cost. Each rotation draws from its own
                CPU generator seeded with ``seed``. :meth:`loss` stays exact. ``None`` or ``1``: exact.
    device:     where the fused segments live and are computed (default: the first block's device);
                rotations on another device are moved there and gradients returned on theirs. With
                ``fused=False`` each rotation's own device computes, as the reference path does.

    Compute dtype is each rotation's dtype: float32 rotations on float32 segments run in float32 with
    no per-step conversion; a rotation of another dtype casts each segment per step.
    """

    def __init__(
        self,
        blocks: list[WeightBlock],
        normalize: bool = False,
        *,
        fused: bool = True,
        chunk_rows: int | None = None,
        sample_fraction: float | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        blocks = list(blocks)
        if not blocks:
            raise InvalidInputError("FourthPower needs at least one weight block")
        for b in blocks:
            if not isinstance(b, WeightBlock):
                raise InvalidInputError(f"FourthPower expects WeightBlock items, got {type(b).__name__}")
            if not b.weight.is_floating_point():
                raise InvalidInputError(f"block {b.name!r}: weight must be floating point, got {b.weight.dtype}")
            check_finite_tensor(b.weight, f"block {b.name!r} ({b.rotation}, side {b.side!r})")
        self.blocks = blocks
        self.normalize = bool(normalize)
        self.fused = bool(fused)
        self._dims = block_dims(blocks)
        self.chunk_rows = {name: check_chunk_rows(chunk_rows, n) for name, n in self._dims.items()}
        sampled = sample_fraction is not None and sample_fraction != 1
        if sampled:
            RowSampler(sample_fraction, seed)  # validates the fraction
        self.sample_fraction = float(sample_fraction) if sampled else None
        # one generator per rotation, all seeded with `seed`: a rotation's draws do not depend on the
        # other rotations of the objective (one R2.i at a time draws what a joint objective draws)
        self._samplers = {name: RowSampler(sample_fraction, seed) for name in self._dims} if sampled else {}
        self.device = check_device(device, "device") if device is not None else blocks[0].weight.device
        self._kernels = {name: FourthPowerKernel(n, self.chunk_rows[name]) for name, n in self._dims.items()}
        # {rotation name: [(rows [m, n], coefficient c_b), ...]}: the blocks as views (reference path)
        self._groups: dict[str, list[tuple[torch.Tensor, float]]] = {}
        for b in blocks:
            self._groups.setdefault(b.rotation, []).append((b.as_rows(), self._coefficient(b)))
        # {rotation name: [segment [<= chunk_rows, n], ...]}: the packed copy (fused path)
        self._segments: dict[str, list[torch.Tensor]] = {}
        if self.fused:
            for name, members in self._groups.items():
                dtype = torch.float32
                for rows, _ in members:
                    dtype = torch.promote_types(dtype, rows.dtype)
                packer = RowPacker(self._dims[name], self.chunk_rows[name], dtype, self.device, reuse=False)
                segs: list[torch.Tensor] = []
                for rows, coef in members:
                    segs.extend(packer.add(rows.detach(), coef**0.25))
                segs.extend(packer.flush())
                self._segments[name] = segs

    def _coefficient(self, block: WeightBlock) -> float:
        if not self.normalize:
            return 1.0
        frob2 = float(block.weight.detach().to(torch.float64).square().sum())
        if frob2 == 0.0:
            raise InvalidInputError(f"block {block.name!r} is all zeros; normalize=True needs a nonzero weight")
        return block.weight.numel() / frob2**2

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._dims)

    def segments(self, name: str) -> list[torch.Tensor]:
        """The fused row segments of rotation ``name`` (``[<= chunk_rows, n]`` each; empty with
        ``fused=False``), e.g. to time the bare products on them."""
        if name not in self._dims:
            raise InvalidInputError(f"no rotation {name!r}; this objective has {sorted(self._dims)}")
        return list(self._segments.get(name, []))

    @property
    def packed_bytes(self) -> int:
        """Bytes held by the fused copy of the weights (0 with ``fused=False``)."""
        return sum(s.numel() * s.element_size() for segs in self._segments.values() for s in segs)

    def _pieces(self, name: str, R: torch.Tensor):
        """``(rows [m, n] on R's device, weight)`` covering every row of rotation ``name``."""
        if self.fused:
            for seg in self._segments[name]:
                yield seg, 1.0
            return
        step = self.chunk_rows[name]
        for rows, coef in self._groups[name]:
            A = rows.detach().to(device=R.device, dtype=R.dtype)
            for i in range(0, A.shape[0], step):
                yield A[i:i + step], coef

    def _compute_rotation(self, name: str, rotations: Rotations) -> tuple[torch.Tensor, torch.Tensor]:
        """The compute-device copy of rotation ``name`` and the original (for the gradient's device)."""
        R = get_rotation(rotations, name, self._dims[name]).detach()
        return (R.to(self.device) if self.fused else R), R

    def loss(self, rotations: Rotations) -> torch.Tensor:
        """The loss (float64 0-dim tensor); differentiable by autograd when a rotation requires grad,
        otherwise computed by the closed-form kernel (exact, never sampled)."""
        needs_graph = torch.is_grad_enabled() and any(
            isinstance(rotations.get(k), torch.Tensor) and rotations[k].requires_grad for k in self._groups
        )
        if not needs_graph:
            total = torch.zeros((), dtype=torch.float64)
            with torch.no_grad():
                for name in self._groups:
                    Rc, _ = self._compute_rotation(name, rotations)
                    total += value_rows(self._pieces(name, Rc), Rc, self._kernels[name]).cpu()
            return total
        total = None
        for name, members in self._groups.items():
            R = get_rotation(rotations, name, self._dims[name])
            for rows, coef in members:
                Y = rows.to(device=R.device, dtype=R.dtype) @ R
                term = coef * Y.square().square().sum(dim=-1).sum(dtype=torch.float64)
                total = term if total is None else total + term
        return total

    def value_and_grad(self, rotations: Rotations) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Closed form: ``(loss in float64, {name: sum_b 4 c_b A_b.T @ (A_b @ R)^3})``, no autograd graph.

        With ``sample_fraction < 1`` both are the unbiased row-sampled estimates (see the class doc).
        """
        total = torch.zeros((), dtype=torch.float64)
        grads: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in self._groups:
                Rc, R = self._compute_rotation(name, rotations)
                loss, G = accumulate_rows(self._pieces(name, Rc), Rc, self._kernels[name], self._samplers.get(name))
                total += loss.cpu()
                grads[name] = G.to(R.device)
        return total, grads

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sampling generators' states (``{"sampler.<rotation>": uint8 tensor}``; empty when exact),
        so that a resumed run draws the rows an uninterrupted one would."""
        return {f"sampler.{k}": s.generator.get_state() for k, s in self._samplers.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`; ValueError if it names other samplers."""
        want = {f"sampler.{k}" for k in self._samplers}
        if set(state) != want:
            raise InvalidInputError(f"objective state has samplers {sorted(state)}, this objective {sorted(want)}")
        for k, s in self._samplers.items():
            s.generator.set_state(state[f"sampler.{k}"].clone())

    def __repr__(self) -> str:
        extra = "" if self.sample_fraction is None else f", sample_fraction={self.sample_fraction}"
        return (f"FourthPower({len(self.blocks)} blocks, dims={self._dims}, normalize={self.normalize}, "
                f"fused={self.fused}{extra})")
