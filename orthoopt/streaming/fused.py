"""Norm-fused weights read from disk, one layer (or one slice of the embedding) at a time.

Exactly what :meth:`orthoopt.adapters.DecoderAdapter.fuse_norms` makes of a model loaded in ``dtype``
(``load_model(path, dtype)``): every tensor is cast to ``dtype``, each residual pre-norm's scale is folded
into the projections reading it by :func:`orthoopt.adapters.fusion.fold_layer` (the table's readers;
the final norm into lm_head with :func:`orthoopt.adapters.fusion.fold_scale`) and set to the identity. A tied ``lm_head`` gets its own folded copy of the embedding when the final
norm's scale is not all ones (the adapter unties it then); otherwise it stays tied and has no block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from orthoopt.adapters.archs import UnsupportedModelError, effective_scale, identity_weight, r1_refusal
from orthoopt.adapters.fusion import fold_layer, fold_scale
from orthoopt.adapters.writeback import layer_r1_entries
from orthoopt.errors import InvalidInputError
from orthoopt.models.safetensors_folder import SafetensorsCheckpoint
from orthoopt.streaming.layout import DecoderLayout

Unit = int | str
"""A piece of the R1 row stream: ``"embed"``, a layer index, or ``"lm_head"``."""


class FusedReader:
    """Norm-fused tensors of a checkpoint in ``dtype`` (see the module doc).

    rows_per_read: rows of the embedding / lm_head read at once (they can be larger than a layer).
    """

    def __init__(self, ckpt: SafetensorsCheckpoint, layout: DecoderLayout, dtype: torch.dtype = torch.float32,
                 rows_per_read: int = 1 << 14) -> None:
        if not dtype.is_floating_point:
            raise InvalidInputError(f"dtype must be floating point, got {dtype}")
        self.ckpt, self.layout, self.dtype = ckpt, layout, dtype
        self.rows_per_read = int(rows_per_read)
        final = ckpt.read([layout.key(layout.final_norm)], dtype)[layout.key(layout.final_norm)]
        kind = layout.spec.final_norm_kind
        self._final_fold = effective_scale(final, kind)  # float64, as the adapter folds it
        self.final_norm_scale = self._final_fold.to(dtype)
        self.final_norm_identity = identity_weight(final, kind)
        """The final norm's weight after fusion (ones; zeros for a ``(1 + w)`` norm), in ``dtype``."""
        self.untie = layout.tied and not bool((self.final_norm_scale == 1).all())
        post = {layout.key(layout.layer_modules(i)[n.role]): n.kind
                for i in range(layout.num_layers) for n in layout.spec.post_norms}
        reason = r1_refusal({k: effective_scale(w, post[k]) for k, w in ckpt.read(list(post), dtype).items()}) if post else None
        if reason:  # the streamed path learns R1
            raise UnsupportedModelError(f"{ckpt.path}: {reason}")
        self.vocab = ckpt.shape(layout.key(layout.embed))[0]
        keys = list(ckpt)
        self._layer_keys = {i: [k for k in keys if k.startswith(layout.layer_prefix(i))] for i in range(layout.num_layers)}

    @property
    def has_lm_head_block(self) -> bool:
        """True when ``lm_head`` is an R1 block of its own (untied, or untied by fusion)."""
        return not self.layout.tied or self.untie

    @property
    def lm_head_source(self) -> str:
        """The key ``lm_head``'s weight is read from (the embedding's while tied)."""
        L = self.layout
        return L.key(L.embed) if L.tied else L.key(L.lm_head)

    def units(self) -> list[Unit]:
        """Every unit of the R1 row stream, in the adapter's block order."""
        return ["embed", *range(self.layout.num_layers), *(["lm_head"] if self.has_lm_head_block else [])]

    def unit_block_name(self, unit: Unit) -> str | None:
        """The block name of ``"embed"`` / ``"lm_head"`` (the adapter's), None for a layer."""
        return {"embed": self.layout.embed, "lm_head": self.layout.lm_head}.get(unit) if isinstance(unit, str) else None

    def unit_numel(self, unit: Unit) -> int:
        """Number of R1 weights in ``unit`` (for balancing shards)."""
        L, c = self.layout, self.ckpt
        if unit == "embed":
            return c.numel(L.key(L.embed))
        if unit == "lm_head":
            return c.numel(self.lm_head_source)
        return sum(c.numel(L.param_key(unit, r)) for r in L.roles(unit))

    # tensors ------------------------------------------------------------------------------------
    def layer_keys(self, i: int) -> list[str]:
        """Keys of every tensor of layer ``i`` (projections, norms, biases, Qwen3's q/k norms)."""
        return list(self._layer_keys[i])

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Every tensor of layer ``i`` (``{key: tensor}`` in ``dtype``) with its norms fused."""
        L = self.layout
        t = self.ckpt.read(self._layer_keys[i], self.dtype)
        t.update(fold_layer(L.spec, t, L.layer_key_prefix(i)))
        return t

    def _row_slices(self, key: str) -> Iterator[tuple[int, int]]:
        rows = self.ckpt.shape(key)[0]
        for start in range(0, rows, self.rows_per_read):
            yield start, min(rows, start + self.rows_per_read)

    def embed_rows(self) -> Iterator[torch.Tensor]:
        """The embedding ``[vocab, hidden]`` in row slices (not fused: no norm reads it)."""
        key = self.layout.key(self.layout.embed)
        for start, stop in self._row_slices(key):
            yield self.ckpt.read_rows(key, start, stop, self.dtype)

    def lm_head_rows(self) -> Iterator[torch.Tensor]:
        """``lm_head``'s weight in row slices, the final norm folded in (only if it is a block)."""
        if not self.has_lm_head_block:
            return
        key = self.lm_head_source
        for start, stop in self._row_slices(key):
            yield fold_scale(self.ckpt.read_rows(key, start, stop, self.dtype), self._final_fold)

    def r1_pieces(self, units: Iterable[Unit] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(block name, rows [m, hidden])`` of the R1 blocks in ``units`` (default all), in block order.

        Rows are ``block.as_rows()`` of the adapter's blocks: ``W`` for side "in", ``W.T`` for side
        "out" (o_proj, down_proj). Large blocks come in several consecutive pieces.
        """
        L = self.layout
        for unit in self.units() if units is None else units:
            if unit == "embed":
                for rows in self.embed_rows():
                    yield L.embed, rows
            elif unit == "lm_head":
                for rows in self.lm_head_rows():
                    yield L.lm_head, rows
            else:
                t = self.layer(unit)
                for block, _, _ in layer_r1_entries(L.spec, t, L.layer_key_prefix(unit), f"{L.spec.layers}.{unit}"):
                    yield block.name, block.as_rows()
                del t
