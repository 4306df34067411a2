"""The method registry: one :class:`Method` entry per rotation method, the only statement of what it needs.

Everything else is derived from :data:`METHODS`: the settings checks of
:class:`~orthoopt.config.RotateConfig` (default solver, steps, lr, which fields a method takes), the
objective the phase loop builds (:func:`orthoopt.pipeline.build_objective` calls the entry's
``objective`` factory with the statistics its ``statistics`` kind names), how the loop plans the units
(``joint``) and schedules the step size (``schedule``), which methods the safetensors store streams
(``streamed``), the choices and help of ``orthoopt rotate`` and the method table of ``docs/solvers.md``
(:func:`method_table_markdown`, checked by ``tests/test_docs.py``).

Adding a method is one entry plus its objective file (``docs/objectives.md``, "Adding a method"). This
module knows objectives only: the factories receive the blocks and statistics already taken
(:class:`ObjectiveInputs`, :class:`StreamedInputs`) and never see a model, a store or a solver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from orthoopt.errors import InvalidInputError
from orthoopt.objectives import DFRotLoss, FourthPower, HessianWeighted, Kurtosis, Objective, QuantizedLMLoss

KINDS = ("fixed", "learned")
STATISTICS = {
    "none": "the weights alone",
    "hessians": "per-layer input Hessians X.T X of calibration text",
    "activations": "the inputs of the rotated layers on calibration text",
    "model": "the rotated, fake-quantized model on calibration batches",
}
"""What an objective reads besides the weights; all but ``"none"`` need calibration text."""
SCHEDULES = ("constant", "cosine")


@dataclass
class ObjectiveInputs:
    """What a method's ``objective`` factory gets for one unit (a solve), taken by the weight store.

    Parameters
    ----------
    blocks : list of WeightBlock
        The unit's weight blocks (``embed_tokens`` / ``lm_head`` left out unless ``include_embeddings``);
        empty for statistics ``"model"``.
    hessians : list or None
        Statistics ``"hessians"``: the input Hessian of each block (None for a block without one).
    activations : dict or None
        Statistics ``"activations"``: ``{rotation: X [rows, n]}``, the rows each rotation multiplies.
    model_loss : callable or None
        Statistics ``"model"``: the loss of the rotated, fake-quantized network
        (:class:`orthoopt.quant.rotated.RotatedQuantLM`).
    calib : Tensor or None
        Calibration token ids ``[N, L]``.
    sample_fraction, seed, device, batch_size, micro_batch_size
        The run's settings (:class:`~orthoopt.config.RotateConfig`).
    """

    blocks: list = field(default_factory=list)
    hessians: list | None = None
    activations: dict | None = None
    model_loss: Callable | None = None
    calib: torch.Tensor | None = None
    sample_fraction: float | None = None
    seed: int = 0
    device: Any = None
    batch_size: int = 1
    micro_batch_size: int | None = None


@dataclass
class StreamedInputs:
    """What a method's ``streamed`` factory gets for the R1 unit of the safetensors store.

    Parameters
    ----------
    reader : orthoopt.streaming.FusedReader or orthoopt.streaming.weighted.WeightedRows
        The norm-fused checkpoint, read layer by layer; for statistics ``"hessians"`` its
        Hessian-weighted blocks ``W H^(1/2)``, formed once by the store.
    units : list
        This process's share of the R1 row stream (``"embed"``, layer indices, ``"lm_head"``).
    chunk_rows, sample_fraction, seed, device
        The run's settings (:class:`~orthoopt.config.RotateConfig`).
    """

    reader: Any
    units: list
    chunk_rows: int | None = None
    sample_fraction: float | None = None
    seed: int = 0
    device: Any = None


@dataclass(frozen=True)
class Method:
    """One rotation method: what it is, what it needs and how it is solved by default.

    Parameters
    ----------
    name : str
        The ``--method`` name.
    description : str
        One line for tables and help.
    paper : str
        The source (authors, year, arXiv id); ``""`` for none.
    kind : {"fixed", "learned"}
        Fixed: drawn, never solved. Learned: an objective minimized by a solver.
    init : str or None
        Fixed methods: the :func:`orthoopt.solvers.initial_rotations` kind drawn for every rotation.
    objective : callable or None
        Learned methods: ``objective(inputs: ObjectiveInputs) -> Objective`` for one unit.
    solver : str or None
        The default solver (``orthoopt.solvers.SOLVERS``) of a learned method.
    steps : int
        Default solver steps per phase (the budget in which the default solver gets within 1% of
        the best loss found, ``docs/solvers.md``).
    lr : float or None
        Default step size when neither lr nor solver is given (None: the solver's default).
    statistics : str
        A key of :data:`STATISTICS`: what the objective reads besides the weights.
    joint : bool
        True: all selected rotations are learned in one solve (one unit); False: R1, then each
        layer's R2 as its own unit.
    schedule : {"constant", "cosine"}
        Cosine: the step size decays as ``lr * (1 + cos(pi * step / steps)) / 2``.
    sampling : bool
        Takes ``sample_fraction`` (row sampling of the objective's weight rows).
    streamed : callable or None
        ``streamed(inputs: StreamedInputs) -> Objective``: the R1 objective read from disk, for the
        safetensors store (each layer's R2 uses ``objective`` on that layer's blocks). Fixed methods
        stream without one.
    """

    name: str
    description: str
    paper: str
    kind: str
    init: str | None = None
    objective: Callable[[ObjectiveInputs], Objective] | None = None
    solver: str | None = None
    steps: int = 100
    lr: float | None = None
    statistics: str = "none"
    joint: bool = False
    schedule: str = "constant"
    sampling: bool = False
    streamed: Callable[[StreamedInputs], Objective] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.statistics not in STATISTICS or self.schedule not in SCHEDULES:
            raise InvalidInputError(f"method {self.name!r}: kind, statistics or schedule unknown "
                             f"({self.kind!r}, {self.statistics!r}, {self.schedule!r})")
        if (self.kind == "fixed") != (self.init is not None) or self.learned != (self.objective is not None
                                                                                   and self.solver is not None):
            raise InvalidInputError(f"method {self.name!r}: a fixed method names an init kind, a learned one an "
                             "objective and a solver")

    @property
    def learned(self) -> bool:
        """True for a method that solves for its rotations."""
        return self.kind == "learned"

    @property
    def needs_calibration(self) -> bool:
        """True when the objective reads calibration text."""
        return self.statistics != "none"

    @property
    def per_phase_statistics(self) -> bool:
        """True when a phase's statistics are taken once, before its first unit (hessians, activations)."""
        return self.statistics in ("hessians", "activations")

    @property
    def simulates_quantization(self) -> bool:
        """True when the objective runs the fake-quantized model (takes ``sim_quant``, ``batch_size``)."""
        return self.statistics == "model"

    @property
    def supports_streamed(self) -> bool:
        """True when the safetensors store can run it: fixed; data-free, or of input Hessians, with a
        streamed R1 objective (for ``"hessians"`` it reads the store's weighted blocks ``W H^(1/2)``); or
        an objective of activations alone (the store takes them layer by layer). Not a joint method,
        nor one whose objective runs the whole model (statistics ``"model"``)."""
        if not self.learned:
            return True
        if self.joint:
            return False
        return self.statistics == "activations" or (self.statistics in ("none", "hessians") and self.streamed is not None)

    @property
    def streams_bit_for_bit(self) -> bool:
        """True when its streamed run equals the in-memory one bit for bit (fixed methods, objectives of
        activations, which the store takes as the in-memory one does, and streamed objectives that add
        in the in-memory order); False for :func:`summed_by_layer` factories, equal up to the order of
        the float sums."""
        return self.supports_streamed and (not self.learned or self.statistics == "activations"
                                           or getattr(self.streamed, "bit_for_bit", True))


def check_sampling(entry: Method, sample_fraction: float | None, device: Any) -> None:
    """Refuse row sampling for a method without ``sampling``.

    Every learned objective computes on ``device``: most where the rotations are (their rows,
    activations or weighted blocks follow them); one that simulates quantization where the model is,
    which the in-memory store moves to ``device`` while that method's rotations are solved.

    Parameters
    ----------
    entry : Method
        The run's method.
    sample_fraction, device
        The run's settings (None: not given).

    Raises
    ------
    ValueError
        ``sample_fraction`` for a learned method without ``sampling`` (names the methods that take it).
    """
    if entry.learned and not entry.sampling and sample_fraction is not None:
        raise InvalidInputError(f"sample_fraction is supported by method "
                         f"{', '.join(map(repr, names(lambda m: m.sampling)))} only, not {entry.name!r}")


def summed_by_layer(objective: Callable[[ObjectiveInputs], Objective]) -> Callable[[StreamedInputs], Objective]:
    """A ``streamed`` factory for a data-free objective that is a sum over blocks.

    Parameters
    ----------
    objective : callable
        The entry's ``objective(inputs: ObjectiveInputs) -> Objective``.

    Returns
    -------
    callable
        ``streamed(inputs: StreamedInputs) -> Objective``: each step reads the R1 blocks unit by unit
        and adds ``objective``'s loss and gradient on them
        (:class:`orthoopt.streaming.objective.StreamedBlockSum`); equal to the in-memory objective up
        to the order of the float sums, not bit for bit. Its steps are exact (no row sampling): give
        the entry ``sampling=False``.
    """

    def streamed(inputs: StreamedInputs) -> Objective:
        from orthoopt.streaming.objective import StreamedBlockSum

        def make(blocks: list) -> Objective:
            # exact steps only: a per-unit objective is built anew every call, so a sampler would restart
            return objective(ObjectiveInputs(blocks=blocks, seed=inputs.seed, device=inputs.device))

        return StreamedBlockSum(inputs.reader, inputs.units, make)

    streamed.bit_for_bit = False  # Method.streams_bit_for_bit
    return streamed


def _fourth_power(i: ObjectiveInputs) -> Objective:
    return FourthPower(i.blocks, sample_fraction=i.sample_fraction, seed=i.seed, device=i.device)


def _streamed_fourth_power(i: StreamedInputs) -> Objective:
    from orthoopt.streaming.objective import StreamedFourthPower

    return StreamedFourthPower(i.reader, i.units, chunk_rows=i.chunk_rows, sample_fraction=i.sample_fraction,
                               seed=i.seed, device=i.device)


def _lm_loss(i: ObjectiveInputs) -> Objective:
    return QuantizedLMLoss(i.model_loss, i.calib, batch_size=i.batch_size, micro_batch_size=i.micro_batch_size)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("identity", "no rotation (norms are still fused)", "", "fixed", init="identity"),
    Method("random", "Haar-random orthogonal", "", "fixed", init="random"),
    Method("hadamard", "random Hadamard `D H / sqrt(n)` (QuaRot)", "Ashkboos et al. 2024, arXiv:2404.00456",
           "fixed", init="hadamard"),
    Method("optrot", "fourth power of the rotated weights (`FourthPower`)", "Gadhikar et al. 2025, arXiv:2512.24124",
           "learned", objective=_fourth_power, solver="cayley-lbfgs", steps=150, sampling=True,
           streamed=_streamed_fourth_power),
    Method("optrot+", "fourth power of `W H^(1/2)` rotated (`HessianWeighted`)",
           "Gadhikar et al. 2025, arXiv:2512.24124", "learned",
           objective=lambda i: HessianWeighted(i.blocks, i.hessians), solver="cayley-lbfgs", statistics="hessians",
           streamed=_streamed_fourth_power),  # streamed: the store's weighted blocks are its rows
    Method("kurtosis", "activation kurtosis towards 1.8 (`Kurtosis`, KurTail)",
           "Akhondzadeh et al. 2025, arXiv:2503.01483", "learned",
           objective=lambda i: Kurtosis(i.activations), solver="cayley-lbfgs", steps=250, statistics="activations"),
    Method("dfrot", "weighted per-token quantization error (`DFRotLoss`)", "Xiang & Zhang, COLM 2025",
           "learned", objective=lambda i: DFRotLoss(i.activations), solver="procrustes", statistics="activations"),
    Method("spinquant", "causal-LM loss of the fake-quantized model (`QuantizedLMLoss`)",
           "Liu et al. 2024, arXiv:2405.16406", "learned", objective=_lm_loss, solver="cayley-sgd", lr=1.5,
           statistics="model", joint=True, schedule="cosine"),
)}
"""Every ``--method``, by name (in this order in choices, help and docs)."""


def method(name: str) -> Method:
    """The registry entry of a method.

    Parameters
    ----------
    name : str
        A ``--method`` name.

    Returns
    -------
    Method

    Raises
    ------
    ValueError
        For an unknown name, listing the choices.
    """
    if name not in METHODS:
        raise InvalidInputError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def names(where: Callable[[Method], bool] = lambda m: True) -> tuple[str, ...]:
    """The names of the methods for which ``where(entry)`` holds.

    Parameters
    ----------
    where : callable, optional
        ``where(entry) -> bool``; default: every method.

    Returns
    -------
    tuple of str
        In registry order.
    """
    return tuple(n for n, m in METHODS.items() if where(m))


def listing(where: Callable[[Method], bool], show: Callable[[Method], Any]) -> str:
    """``"optrot 150, optrot+ 100, ..."``, for help texts.

    Parameters
    ----------
    where : callable
        ``where(entry) -> bool`` selects the methods.
    show : callable
        ``show(entry)``: what follows each name.

    Returns
    -------
    str
    """
    return ", ".join(f"{n} {show(m)}" for n, m in METHODS.items() if where(m))


def method_table_markdown(methods: Mapping[str, Method] | None = None) -> str:
    """The method table of ``docs/solvers.md``, generated from the registry.

    Parameters
    ----------
    methods : mapping, optional
        ``{name: Method}``; default :data:`METHODS`.

    Returns
    -------
    str
        A markdown table, one row per entry, ending in a newline. ``tests/test_docs.py`` checks the page
        holds exactly this text; ``python -m orthoopt.methods`` prints it.
    """
    rows = ["| method | kind | rotation / objective | calibration | default solver | default steps per phase "
            "| lr | streamed | source |", "|---|---|---|---|---|---:|---|---|---|"]
    for m in (METHODS if methods is None else methods).values():
        lr = "solver's" if m.lr is None else f"{m.lr:g}"
        lr = "-" if not m.learned else lr + (f", {m.schedule}" if m.schedule != "constant" else "")
        rows.append(f"| {m.name} | {m.kind}{', joint' if m.joint else ''} | {m.description} | "
                    f"{'yes: ' + m.statistics if m.needs_calibration else 'no'} | "
                    f"{'`' + m.solver + '`' if m.learned else '-'} | {m.steps if m.learned else '-'} | {lr} | "
                    f"{'yes' if m.supports_streamed else 'no'} | {m.paper or '-'} |")
    return "\n".join(rows) + "\n"


__all__ = ["METHODS", "Method", "ObjectiveInputs", "STATISTICS", "StreamedInputs", "check_sampling", "listing",
           "method",
           "method_table_markdown", "names", "summed_by_layer"]

if __name__ == "__main__":  # pragma: no cover
    print(method_table_markdown(), end="")
