"""Calibration statistics of a checkpoint on disk, taken one decoder layer at a time.

The streamed store's data methods (:attr:`orthoopt.methods.Method.supports_streamed`) need the inputs
of the rotated linear layers on calibration text, as the in-memory store takes them with forward hooks
on the whole norm-fused model (:func:`orthoopt.adapters.calibration.linear_inputs`). Here the
calibration windows go through a :class:`FusedLayers` model layer by layer (the passes of
:mod:`orthoopt.eval.layered`): each layer is read norm-fused (and R1-rotated for the R2 phase) from
the :class:`~orthoopt.streaming.fused.FusedReader`, its linear inputs are recorded while it runs, and
it is freed. The layers compute what the in-memory fused model computes, the windows run as one batch
and the same tokens are kept (:func:`orthoopt.adapters.calibration.sampled_tokens`), so the rows are
the in-memory store's (``tests/test_streamed_statistics.py``).

Memory: the non-layer weights, one layer, the calibration windows' hidden states and what the caller
keeps of each layer's rows.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from orthoopt.adapters.calibration import sampled_tokens
from orthoopt.errors import InvalidInputError
from orthoopt.adapters.archs import layer_output
from orthoopt.eval.layered import record_layer_inputs
from orthoopt.models.onload import LayeredModel
from orthoopt.streaming.fused import FusedReader
from orthoopt.hadamard.signed import SignedHadamard
from orthoopt.streaming.layer_rotation import apply_r1, rotate_rows


class FusedLayers(LayeredModel):
    """A :class:`~orthoopt.models.onload.LayeredModel` of the norm-fused (and R1-rotated) checkpoint.

    Parameters
    ----------
    reader : FusedReader
        The norm-fused tensors; their dtype is the model's.
    R1 : torch.Tensor, optional
        Float64 ``[hidden, hidden]`` (or the :class:`~orthoopt.hadamard.SignedHadamard` it is): fused into
        the embedding and every layer as it is read.
    device : str or torch.device, optional
        Where the layers run (default: the CPU).

    Notes
    -----
    The final norm is the fused one (the identity); ``lm_head`` is left as read (statistics never run it).
    """

    def __init__(self, reader: FusedReader, R1: torch.Tensor | SignedHadamard | None = None, device=None) -> None:
        super().__init__(reader.ckpt.path, reader.dtype, device)
        self.reader, self.R1 = reader, R1
        L = reader.layout
        state = {L.key(L.final_norm): reader.final_norm_identity}
        if R1 is not None:
            state[L.key(L.embed)] = torch.cat([rotate_rows(rows, R1) for rows in reader.embed_rows()])
        self.model.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=False, assign=True)

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Decoder layer ``i``'s tensors norm-fused (and R1-rotated), as :meth:`load_layer` loads them."""
        t = self.reader.layer(i)
        if self.R1 is not None:
            apply_r1(t, self.reader.layout, i, self.R1)
        return t


@torch.no_grad()
def layer_statistics(layered: FusedLayers, calib: torch.Tensor, roles: Iterable[str], kind: str, *,
                     max_tokens: int = 2048, seed: int = 0, head: bool = False,
                     progress: bool = True) -> Iterator[tuple[int | str, dict[str, torch.Tensor]]]:
    """The inputs of layer by layer's linear modules on ``calib``, one layer loaded at a time.

    Parameters
    ----------
    layered : FusedLayers
        The model.
    calib : torch.Tensor
        Token ids ``[N, L]``, run as one batch (as the in-memory statistics run them).
    roles : iterable of str
        Projection roles of the architecture table whose inputs are taken (in every layer that has them).
    kind : {"rows", "hessians"}
        ``"rows"``: float32 ``[T, in]`` input rows at the tokens
        :func:`~orthoopt.adapters.calibration.sampled_tokens` keeps (as
        :func:`~orthoopt.adapters.calibration.linear_inputs`); ``"hessians"``: float64
        ``(1/T) X.T @ X`` over all tokens (as :func:`~orthoopt.adapters.calibration.input_hessians`).
    max_tokens, seed : int
        The token sample of ``"rows"``.
    head : bool
        Also yield ``("lm_head", {lm_head module name: ...})``: the final norm's output.
    progress : bool
        A progress bar over the layers.

    Yields
    ------
    (layer index or "lm_head", {module name: tensor})
        Module names as :meth:`orthoopt.streaming.layout.DecoderLayout.layer_modules` gives them; the
        roles of one input-sharing group map to one tensor object.
    """
    if kind not in ("rows", "hessians"):
        raise InvalidInputError(f"kind must be 'rows' or 'hessians', got {kind!r}")
    if not isinstance(calib, torch.Tensor) or calib.ndim != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise InvalidInputError("calib must be integer token ids [N, L]")
    layout = layered.reader.layout
    idx = sampled_tokens(calib.numel(), max_tokens, seed) if kind == "rows" else None
    count = calib.numel()

    def measure(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().reshape(-1, x.shape[-1])
        if kind == "hessians":
            x = x.to(torch.float64)
            return (x.T @ x / count).cpu()
        x = x.to("cpu", torch.float32)
        return x if idx is None else x[idx]

    hidden, kwargs = record_layer_inputs(layered, [calib])
    h, kw = hidden[0], kwargs[0]
    roles = list(roles)
    for i in tqdm(range(len(layered)), desc="calibration statistics", unit="layer", disable=not progress,
                  file=sys.stderr):
        layer = layered.load_layer(i)
        names = layout.layer_modules(i)
        taken: dict[str, torch.Tensor] = {}
        handles = []
        leaders = layout.spec.input_leaders([r for r in roles if r in layout.roles(i)])  # one hook per group
        for lead in leaders:

            def hook(_module, args, lead=lead):
                taken[lead] = measure(args[0])

            handles.append(layer.get_submodule(layout.spec.proj(lead).path).register_forward_pre_hook(hook))
        try:
            h = layer_output(layer(h, **kw[i]))
        finally:
            for handle in handles:
                handle.remove()
            layered.release_layer(i)
        yield i, {names[r]: taken[lead] for lead, group in leaders.items() if lead in taken for r in group}
    if head:
        norm = layered.model.get_submodule(f"{layout.spec.decoder}.{layout.final_norm}")
        yield "lm_head", {layout.lm_head: measure(norm(h))}


__all__ = ["FusedLayers", "layer_statistics"]
