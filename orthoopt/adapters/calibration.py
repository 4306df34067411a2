"""Inputs of a decoder's linear layers on calibration text, for data-driven objectives.

Forward pre-hooks record the input rows ``x`` (``[tokens, in_features]``, row vectors as in
``docs/conventions.md``) of the named modules (``nn.Linear`` projections, MoE routers and expert
modules, whose first forward argument is their input). Modules that read the same tensor (one
input-sharing group of the architecture table, ``Proj.group``: q/k/v read ``input_layernorm``'s
output, gate/up ``post_attention_layernorm``'s) are recorded once and share the result. Nothing here knows about objectives.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from orthoopt.adapters.archs import DecoderModules
from orthoopt.errors import InvalidInputError


def input_groups(m: DecoderModules, modules: Iterable[str] | None = None) -> dict[str, list[str]]:
    """``{hooked module name: [names sharing its input]}`` for the requested linear modules.

    ``modules`` defaults to every projection's module and ``lm_head`` (see
    ``DecoderModules.input_modules``); an unknown name raises ValueError.
    """
    linears = m.input_modules()
    wanted = list(linears) if modules is None else list(dict.fromkeys(modules))
    unknown = [n for n in wanted if n not in linears]
    if unknown:
        raise InvalidInputError(f"not linear modules of this model: {unknown[:5]} (e.g. {next(iter(linears))!r})")
    shared: dict[str, str] = {}  # module -> group leader
    for L in m.layers:
        for lead, roles in m.spec.input_leaders(L.projs).items():
            for r in roles:
                shared.setdefault(L.names[r], L.names[lead])
    shared[m.names["lm_head"]] = m.names["lm_head"]
    groups: dict[str, list[str]] = {}
    for n in wanted:
        groups.setdefault(shared[n], []).append(n)
    return groups


def _batches(batches: Iterable[torch.Tensor], progress: bool, desc: str):
    items = list(batches) if not isinstance(batches, torch.Tensor) else [batches]
    for ids in tqdm(items, desc=desc, disable=not progress, leave=False):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise InvalidInputError(f"calibration batches must be integer token-id tensors [batch, seq], got {type(ids).__name__}"
                             + (f" of {ids.dtype}" if isinstance(ids, torch.Tensor) else ""))
        yield ids if ids.ndim == 2 else ids.reshape(1, -1)


def _run(model: nn.Module, ids: torch.Tensor) -> None:
    device = next(model.parameters()).device
    model(input_ids=ids.to(device), use_cache=False)


@torch.no_grad()
def linear_inputs(model: nn.Module, m: DecoderModules, batches: Iterable[torch.Tensor], max_tokens: int = 2048,
                  modules: Iterable[str] | None = None, seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """``{module name: X}`` with ``X`` float32 ``[T, in_features]`` on the CPU: the module's inputs
    at ``T = min(max_tokens, total tokens)`` tokens drawn uniformly without replacement (the same
    tokens for every module). ``batches``: token-id tensors ``[batch, seq]`` (all positions count).
    """
    if max_tokens < 1:
        raise InvalidInputError(f"max_tokens must be >= 1, got {max_tokens}")
    groups = input_groups(m, modules)
    linears = m.input_modules()
    items = list(_batches(batches, False, ""))  # checked and shaped; the bar is the forward loop's below
    if not items:
        raise InvalidInputError("no calibration batches given")
    chosen = kept_positions([ids.numel() for ids in items], max_tokens, seed)  # known before any forward
    kept: dict[str, list[torch.Tensor]] = {leader: [] for leader in groups}
    batch = [0]

    def hook(leader):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sel = chosen[batch[0]]
            kept[leader].append((x if sel is None else x[sel.to(x.device)]).to("cpu", torch.float32))
        return fn

    handles = [linears[leader].register_forward_pre_hook(hook(leader)) for leader in groups]
    try:
        for b, ids in enumerate(tqdm(items, desc="capture inputs", disable=not progress, leave=False)):
            batch[0] = b
            _run(model, ids)
    finally:
        for h in handles:
            h.remove()
    rows = {leader: torch.cat(xs) for leader, xs in kept.items()}
    return {name: rows[leader] for leader, names in groups.items() for name in names}


@torch.no_grad()
def input_hessians(model: nn.Module, m: DecoderModules, batches: Iterable[torch.Tensor],
                   modules: Iterable[str] | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """``{module name: H}`` with ``H = (1/T) sum_t x_t.T x_t`` float64 ``[in, in]`` on the CPU, over
    all ``T`` tokens of ``batches`` (token-id tensors ``[batch, seq]``). Memory: one ``[in, in]``
    float64 matrix per group of modules sharing an input (q/k/v share one, gate/up another).
    """
    groups = input_groups(m, modules)
    linears = m.input_modules()
    acc: dict[str, torch.Tensor] = {}
    count = [0]

    def hook(leader):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            xtx = x.T @ x
            acc[leader] = xtx if leader not in acc else acc[leader] + xtx
        return fn

    handles = [linears[leader].register_forward_pre_hook(hook(leader)) for leader in groups]
    try:
        for ids in _batches(batches, progress, "input hessians"):
            _run(model, ids)
            count[0] += ids.numel()
    finally:
        for h in handles:
            h.remove()
    if count[0] == 0:
        raise InvalidInputError("no calibration batches given")
    means = {leader: (acc[leader] / count[0]).cpu() for leader in groups}
    return {name: means[leader] for leader, names in groups.items() for name in names}


def block_inputs(entries: list, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{block name: X[:, slice]}`` from :func:`orthoopt.adapters.writeback.block_entries` triples and
    :func:`linear_inputs` output; blocks without an input (the embedding) or whose module was not
    captured are left out."""
    out = {}
    for block, module, sl in entries:
        if module is not None and module in inputs:
            X = inputs[module]
            out[block.name] = X if sl is None else X[:, sl]
    return out


def kept_positions(sizes: list[int], max_tokens: int, seed: int = 0) -> list[torch.Tensor | None]:
    """The token positions :func:`linear_inputs` keeps, per batch of ``sizes[b]`` tokens: one float64
    key per token drawn batch by batch from one generator seeded with ``seed``, the ``max_tokens``
    smallest of all kept, each batch's in position order (None: every token of the batch, when all
    the tokens fit in ``max_tokens``). Known before any forward, so a hook keeps only its rows."""
    if max_tokens < 1:
        raise InvalidInputError(f"max_tokens must be >= 1, got {max_tokens}")
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.rand(n, generator=gen, dtype=torch.float64) for n in sizes]
    if sum(sizes) <= max_tokens:
        return [None] * len(sizes)
    idx = torch.topk(torch.cat(keys), max_tokens, largest=False).indices.sort().values
    starts = torch.tensor([0, *sizes]).cumsum(0)
    return [idx[(idx >= starts[b]) & (idx < starts[b + 1])] - starts[b] for b in range(len(sizes))]


def sampled_tokens(num_tokens: int, max_tokens: int, seed: int = 0) -> torch.Tensor | None:
    """The positions :func:`linear_inputs` keeps when its ``batches`` is one tensor of ``num_tokens``
    tokens (:func:`kept_positions` of one batch), for a pass that sees all the tokens at once (one
    decoder layer at a time); None when every token is kept."""
    return kept_positions([num_tokens], max_tokens, seed)[0]


def rotation_rows(entries: Iterable, inputs: dict[str, torch.Tensor],
                  out: dict[str, list[torch.Tensor]] | None = None) -> dict[str, list[torch.Tensor]]:
    """``{rotation: [X, ...]}``: the input rows each rotation multiplies, from ``(block, input module,
    column slice)`` entries of side-"in" blocks and :func:`linear_inputs` output.

    Modules that read one tensor (an input-sharing group: the same tensor object in ``inputs``) count
    once per column slice; entries without a captured input are skipped. ``out`` (appended to, and
    returned) lets a caller add a model's blocks piece by piece, e.g. one decoder layer at a time:
    ``torch.cat`` of each list is what the whole model's entries give at once.
    """
    out = {} if out is None else out
    seen: set[tuple[int, str]] = set()
    for block, module, sl in entries:
        if module is None or module not in inputs:
            continue
        X = inputs[module]
        key = (X.data_ptr(), str(sl))  # modules reading one tensor share it: count it once
        if key in seen:
            continue
        seen.add(key)
        out.setdefault(block.rotation, []).append(X if sl is None else X[:, sl])
    return out
