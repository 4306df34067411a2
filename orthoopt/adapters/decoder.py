"""One adapter for every decoder of the architecture table (:data:`orthoopt.adapters.arch_table.ARCHS`).

Typical use (sides and shapes: ``docs/conventions.md``; the steps: ``docs/adapters.md``)::

    adapter = DecoderAdapter(model)
    adapter.fuse_norms()                              # output unchanged, norm scales become 1
    blocks = adapter.weight_blocks(("R1", "R2"))      # views of the weights, for an objective
    rotations = solve(objective, "hadamard", ...).rotations
    adapter.apply_rotations(rotations)                # validated, then written in float64
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from orthoopt.adapters import calibration, fusion, writeback
from orthoopt.adapters.archs import DecoderModules, check_rms_norm, locate
from orthoopt.core import WeightBlock
from orthoopt.core.checks import check_not_meta
from orthoopt.errors import InvalidInputError
from orthoopt.utils.checks import check_model_weights


class DecoderAdapter:
    """Bridge between a Hugging Face ``*ForCausalLM`` decoder and weight blocks / rotations.

    ``arch`` overrides ``model.config.model_type`` when looking up the layout in
    :data:`orthoopt.adapters.arch_table.ARCHS`. Raises ``UnsupportedModelError`` (a ValueError) naming the
    ``model_type`` and what is missing for an unsupported model, or when a residual norm is not an
    RMSNorm ``x / rms(x) * weight`` (e.g. a mean-subtracting LayerNorm).
    """

    def __init__(self, model: nn.Module, arch: str | None = None) -> None:
        self.model = model
        for name, p in model.named_parameters():  # a model without data gives raw torch errors later
            check_not_meta(p, f"weight {name!r}")
        self.modules: DecoderModules = locate(model, arch)
        for name, (norm, kind) in self.modules.all_norms().items():
            check_rms_norm(name, norm, self.modules.hidden, kind)

    # sizes ---------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.modules.layers)

    @property
    def hidden_size(self) -> int:
        return self.modules.hidden

    @property
    def head_dim(self) -> int:
        return self.modules.head_dim

    @property
    def num_heads(self) -> int:
        return self.modules.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.modules.num_kv_heads

    @property
    def tied(self) -> bool:
        """True while ``lm_head`` shares the embedding tensor."""
        return self.modules.tied

    def rotation_dims(self) -> dict[str, int]:
        """``{"R1": hidden, "R2.0": head_dim, ..., "R2.{L-1}": head_dim}``."""
        return writeback.rotation_dims(self.modules)

    # 1. norm fusion ------------------------------------------------------------------------------
    def fuse_norms(self) -> None:
        """Fold the residual pre-norm scales into their readers (the table's) and lm_head; set them to
        the identity.

        Output unchanged (up to the parameter dtype's rounding); idempotent; unties a tied lm_head when
        the final norm's scale is not all ones. Required before :meth:`weight_blocks` and
        :meth:`apply_rotations`.
        """
        fusion.fuse_norms(self.model, self.modules)

    @property
    def norms_fused(self) -> bool:
        """True when every residual RMSNorm scale is exactly one."""
        return not fusion.unfused_norms(self.modules)

    def _require_fused(self, what: str) -> None:
        bad = fusion.unfused_norms(self.modules)
        if bad:
            raise InvalidInputError(f"{what} needs fused norms: {bad[0]} (and {len(bad) - 1} more) has a scale "
                             f"that is not all ones; call fuse_norms() first")

    # 2. weight blocks ----------------------------------------------------------------------------
    def weight_blocks(self, rotations: Iterable[str] | str = ("R1", "R2")) -> list[WeightBlock]:
        """Blocks of the selected rotations (``"R1"``, ``"R2"`` = every ``R2.i``, or ``"R2.3"``).

        Weights are detached views of the parameters (they follow later in-place updates). R1:
        ``embed_tokens`` (in), per layer every projection of the architecture table with its side
        (Llama: q/k/v/gate/up in, o_proj/down_proj out; expert tensors one block per expert),
        ``lm_head`` (in; omitted while tied, the embedding block stands for both). R2.i: the value
        rows ``...v_proj.head{h}`` (out, one per kv head) and ``...o_proj.head{h}`` (in, one per query
        head). Each block shows the current weight, not rotated by the other rotations. Raises
        ``UnsupportedModelError`` with the reason when R1 is asked for but cannot be fused exactly
        (post-norms with non-uniform scales: OLMo-2, Gemma 2/3).
        """
        self._require_fused("weight_blocks")
        return [b for b, _, _ in writeback.block_entries(self.modules, rotations)]

    def block_sources(self, rotations: Iterable[str] | str = ("R1", "R2")) -> dict[str, tuple[str, slice | None] | None]:
        """``{block name: (linear module name, input column slice or None) or None}``: where a block's
        input activations come from (keys of :meth:`linear_inputs`); None for the embedding."""
        return {b.name: (None if mod is None else (mod, sl))
                for b, mod, sl in writeback.block_entries(self.modules, rotations)}

    # 3. write-back -------------------------------------------------------------------------------
    def validate(self, rotations: Mapping[str, torch.Tensor], tol: float | None = None) -> None:
        """Every check of :meth:`apply_rotations`, without writing: fused norms, finite weights, and
        each rotation's name, shape, finiteness and orthogonality (float64; tolerance
        :func:`orthoopt.adapters.writeback.orthogonality_tolerance` unless ``tol``)."""
        self._require_fused("apply_rotations")
        check_model_weights(self.model)
        writeback.validate_rotations(self.modules, rotations, tol)

    def apply_rotations(self, rotations: Mapping[str, torch.Tensor], tol: float | None = None) -> None:
        """Fuse ``{"R1": ..., "R2.i": ...}`` into the weights in place (missing names = identity).

        Validates everything first (:meth:`validate`) and raises ValueError naming the problem before
        any weight changes. Products in float64, cast back to each parameter's dtype; biases rotate
        with their outputs (v bias per head by R2, writers' biases by R1).
        """
        self.validate(rotations, tol)
        writeback.apply_rotations(self.modules, rotations)

    # 4. calibration inputs -----------------------------------------------------------------------
    def linear_names(self) -> list[str]:
        """Names of every projection and ``lm_head``, in forward order."""
        return list(self.modules.linears())

    def linear_inputs(self, batches: Iterable[torch.Tensor], max_tokens: int = 2048,
                      modules: Iterable[str] | None = None, seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
        """``{module name: X float32 [T, in]}`` at ``T <= max_tokens`` uniformly sampled tokens
        (see :func:`orthoopt.adapters.calibration.linear_inputs`)."""
        return calibration.linear_inputs(self.model, self.modules, batches, max_tokens, modules, seed, progress)

    def input_hessians(self, batches: Iterable[torch.Tensor], modules: Iterable[str] | None = None,
                       progress: bool = True) -> dict[str, torch.Tensor]:
        """``{module name: (1/T) X.T @ X float64 [in, in]}`` over all tokens
        (see :func:`orthoopt.adapters.calibration.input_hessians`)."""
        return calibration.input_hessians(self.model, self.modules, batches, modules, progress)

    def block_inputs(self, inputs: Mapping[str, torch.Tensor], rotations: Iterable[str] | str = ("R1", "R2")) -> dict[str, torch.Tensor]:
        """``{block name: X}``: :meth:`linear_inputs` output sliced per block (o_proj heads get their
        columns); the embedding block has none."""
        return calibration.block_inputs(writeback.block_entries(self.modules, rotations), dict(inputs))
