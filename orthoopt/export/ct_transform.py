"""The online Hadamard before ``down_proj`` (R4) as a compressed-tensors ``transform_config``.

orthoopt's R4 (:mod:`orthoopt.quant.act`) has two halves: the weight half ``W_down -> W_down @ H`` is
already in the quantized weights, the activation half ``x -> x @ H`` runs at load time, before the
input is quantized, with ``H = hadamard_matrix(n) / sqrt(n)``. In compressed-tensors 0.20.1 that
activation half is one transform scheme, written here as

``{"R4": {"type": "hadamard", "apply": [{"targets": [<every down_proj>], "location": "input"}]}}``

``location: input`` is an online transform (a forward pre-hook, run before the module's input
quantization); nothing is fused into the weight at load (no ``weight_input`` entry), because the
checkpoint's ``down_proj`` weights are already rotated. compressed-tensors' ``hadamard`` factory builds
Sylvester's ±1 matrix (``deterministic_hadamard_matrix``, powers of two only) and divides by
``sqrt(n)`` when it applies it; orthoopt's :func:`orthoopt.hadamard.hadamard_matrix` is Sylvester's
matrix for a power of two, so both apply the same orthogonal matrix. :func:`applied_r4` checks that
on the matrices the installed compressed-tensors builds (exact ±1 equality, and its normalized
transform against orthoopt's fast transform) before anything is written.

Sizes that are not powers of two (SmolLM2's 1536 = 12 * 128) are refused (:func:`r4_size_reason`):
``hadamard`` raises for them, ``random-hadamard`` multiplies a different base matrix (Sloane's
library) by random signs, and vLLM's kernel for ``hadamard`` (hadacore) is Sylvester's; none applies
orthoopt's ``kron(B_12, S_128)``. The matrix is stored in the checkpoint
(``...down_proj.R4_input.weight``, ±1, once: the layers share it), as llm-compressor stores it; vLLM
reads it from there for non-``hadamard`` types, compressed-tensors rebuilds it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from orthoopt.adapters.archs import locate
from orthoopt.errors import InvalidInputError
from orthoopt.hadamard import hadamard_matrix, hadamard_transform

SCHEME_NAME = "R4"
TRANSFORM_TYPE = "hadamard"
LOCATION = "input"
SUBMODULE = f"{SCHEME_NAME}_{LOCATION}"  # the name compressed-tensors registers the transform under


def r4_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """``{full module name: linear}`` of the linears that read the online Hadamard (every layer's
    ``ArchSpec.r4_role``, ``down_proj``); ValueError when the architecture has none."""
    m = locate(model)
    role = m.spec.r4_role
    full = {id(mod): name for name, mod in model.named_modules()}
    out = {}
    for L in m.layers:
        lin = L.projs.get(role) if role else None
        if not isinstance(lin, nn.Linear):
            raise InvalidInputError(f"the online Hadamard (R4) is not supported for model_type {m.spec.model_type!r}: "
                             "no dense MLP output projection in every layer")
        out[full[id(lin)]] = lin
    return out


def r4_size_reason(n: int) -> str | None:
    """Why an R4 of size ``n`` cannot be written as a compressed-tensors ``hadamard`` transform that
    applies orthoopt's matrix; None when it can (``n`` a power of two)."""
    if n > 0 and n & (n - 1) == 0:
        return None
    return (
        f"the online Hadamard before down_proj (R4) has size {n}, not a power of two: orthoopt's matrix for it "
        "is kron(base, Sylvester) (docs/hadamard.md), while compressed-tensors' 'hadamard' transform is Sylvester's "
        "and exists only for powers of two, and its 'random-hadamard' multiplies another base matrix by random "
        "signs, so the checkpoint would rotate down_proj's input by a different matrix than its weights were "
        "rotated by; export R4 only for a power-of-two intermediate size, drop --online-hadamard (R1/R2 need "
        "nothing at run time), or keep --format orthoopt, which runs orthoopt's R4 of any size"
    )


def transform_config(targets: list[str], ct_transform) -> object:
    """The ``TransformConfig`` of R4 on ``targets`` (full module names), built with compressed-tensors'
    own models (``ct_transform`` is the ``compressed_tensors.transform`` module)."""
    args = ct_transform.TransformArgs(targets=list(targets), location=LOCATION)
    scheme = ct_transform.TransformScheme(type=TRANSFORM_TYPE, apply=[args], precision=torch.float32)
    return ct_transform.TransformConfig(config_groups={SCHEME_NAME: scheme})


def _r4_targets(model: nn.Module, n: int) -> dict[str, nn.Linear]:
    """:func:`r4_linears` of ``model``, after checking that ``n`` can be exported and is their input size."""
    why = r4_size_reason(n)
    if why:
        raise InvalidInputError(why)
    lins = r4_linears(model)
    sizes = {lin.in_features for lin in lins.values()}
    if sizes != {n}:
        raise InvalidInputError(f"the R4 record says size {n}, the model's down_proj inputs are {sorted(sizes)}")
    return lins


@contextmanager
def applied_r4(model: nn.Module, n: int, ct_transform):
    """Attach compressed-tensors' R4 transform to every ``down_proj`` of ``model`` (so that
    ``ModelCompressor`` records the ``transform_config`` and ``save_pretrained`` stores the matrix),
    after checking that it applies orthoopt's matrix; on exit the model is as before (no transform
    submodules, no hooks, no ``transform_config`` attribute).

    Raises ValueError for a size :func:`r4_size_reason` refuses, RuntimeError if the installed
    compressed-tensors builds a different matrix or normalization than orthoopt's (nothing is left
    attached then either).
    """
    lins = _r4_targets(model, n)
    before = {name: dict(lin._forward_pre_hooks) for name, lin in lins.items()}
    config = transform_config(sorted(lins), ct_transform)
    try:
        ct_transform.apply_transform_config(model, config)
        _check_matrix(lins, n)
        yield config
    finally:
        _remove(model, lins, before)


def stored_r4(model: nn.Module, n: int, ct_transform, dtype: torch.dtype) -> tuple[object, str, torch.Tensor]:
    """What :func:`applied_r4` makes compressed-tensors store, without attaching anything to ``model``
    (whose layers may be on ``meta``): ``(transform config, key, matrix)``, the matrix that
    ``save_pretrained`` writes once under ``key`` (the first target's ``R4_input.weight``; the layers
    share it). The matrix is built by compressed-tensors on a probe linear of ``dtype`` and checked as
    :func:`applied_r4` checks it. Raises ValueError as :func:`applied_r4` does."""
    lins = _r4_targets(model, n)
    probe = nn.Module()
    probe.add_module("down", nn.Linear(n, 1, bias=False, dtype=dtype))
    ct_transform.apply_transform_config(probe, transform_config(["down"], ct_transform))
    _check_matrix({"down": probe.down}, n)
    matrix = getattr(probe.down, SUBMODULE).weight.detach().clone()
    return transform_config(sorted(lins), ct_transform), f"{sorted(lins)[0]}.{SUBMODULE}.weight", matrix


def _check_matrix(lins: dict[str, nn.Linear], n: int) -> None:
    """compressed-tensors' transform on every target is ``x -> x @ hadamard_matrix(n) / sqrt(n)``:
    its stored matrix equals orthoopt's exactly, and its forward agrees with orthoopt's fast transform
    to float32 rounding (rtol 1e-5 of the largest entry; a wrong normalization is off by a factor)."""
    H = hadamard_matrix(n, dtype=torch.float64)
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    want = hadamard_transform(x.double())
    for name, lin in lins.items():
        t = getattr(lin, SUBMODULE, None)
        if t is None:
            raise RuntimeError(f"{name}: compressed-tensors attached no {SUBMODULE} transform")
        if not torch.equal(t.weight.detach().double().cpu(), H):
            raise RuntimeError(f"{name}: compressed-tensors' {TRANSFORM_TYPE} matrix of size {n} is not orthoopt's "
                               "hadamard_matrix(n); the checkpoint would rotate by another matrix")
        got = t(x).double()
        err = (got - want).abs().max().item()
        if err > 1e-5 * want.abs().max().item():
            raise RuntimeError(f"{name}: compressed-tensors' R4 transform differs from x @ H / sqrt({n}) by {err:.3g} "
                               "(normalization)")


def _remove(model: nn.Module, lins: dict[str, nn.Linear], before: dict[str, dict]) -> None:
    """Take out what ``apply_transform_config`` attached: the transform submodule, the forward
    pre-hook it registered, the model's ``transform_config`` attribute."""
    for name, lin in lins.items():
        if SUBMODULE in lin._modules:
            delattr(lin, SUBMODULE)
        for key in [k for k in lin._forward_pre_hooks if k not in before[name]]:
            del lin._forward_pre_hooks[key]
    if "transform_config" in vars(model):
        delattr(model, "transform_config")
