"""Loss curve and orthogonality error of a ``solve`` run (two panels)."""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from orthoopt.core.tolerance import FLOOR
from orthoopt.diagnostics.plots._figure import color, finish, new_figure, style
from orthoopt.errors import InvalidInputError

SIZE = (10.0, 4.5)
"""Figure size in inches: 1000 x 450 px at 100 dpi."""

TOLERANCES = {f"{str(d).removeprefix('torch.')} tolerance": v for d, v in sorted(FLOOR.items(), key=lambda t: -t[1])}
"""Reference lines of the orthogonality panel: the floors of :func:`orthoopt.core.tolerance.orthogonality_tolerance`."""


def _finite_1d(name: str, values) -> np.ndarray:
    a = np.asarray([float(v) for v in values], dtype=np.float64)
    if a.size == 0:
        raise InvalidInputError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise InvalidInputError(f"{name} contains NaN or infinite values")
    return a


def _log_if_spread(ax, values) -> None:
    """Logarithmic y axis when all values are positive and span at least a factor 10."""
    lo, hi = min(values), max(values)
    if lo > 0 and hi / lo >= 10:
        ax.set_yscale("log")


def plot_solve_history(
    history,
    orthogonality_error=None,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Left: loss per step; right: orthogonality error ``||R.T @ R - I||_F``.

    history:             a sequence of losses (one per step), or an object with ``.history`` and
                         ``.orthogonality_error`` (e.g. ``orthoopt.solvers.SolveResult``), whose
                         attributes are used when ``orthogonality_error`` is not given.
    orthogonality_error: a float (final error, drawn as a point), a sequence (one per step, drawn as
                         a line), or a dict ``{rotation name: float}`` or ``{name: sequence}``; None
                         leaves the panel empty with a note.
    save:                path stem; writes ``<save>.png`` and ``<save>.svg``.

    The loss axis is logarithmic when all losses are positive and span a factor 10 or more. The
    orthogonality axis is logarithmic when all errors are positive; it then shows the float32 and
    float64 tolerances (:data:`TOLERANCES`) as dashed lines.
    """
    if hasattr(history, "history"):
        if orthogonality_error is None:
            orthogonality_error = getattr(history, "orthogonality_error", None)
        history = history.history
    if isinstance(history, (str, bytes)) or not hasattr(history, "__iter__"):
        raise InvalidInputError("history must be a sequence of losses or an object with .history")
    losses = _finite_1d("loss history", history)
    with style():
        fig = new_figure(*SIZE)
        ax_loss, ax_orth = fig.subplots(1, 2)
        steps = np.arange(losses.size)
        ax_loss.plot(steps, losses, color=color(0), linewidth=1.6, marker="o" if losses.size < 30 else None,
                     label=f"first {losses[0]:.4g}, last {losses[-1]:.4g}")
        _log_if_spread(ax_loss, losses)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("objective value (loss units)")
        ax_loss.set_title("Loss")
        ax_loss.legend(loc="upper right")
        _plot_orthogonality(ax_orth, orthogonality_error)
        fig.suptitle(title or "Rotation solve")
    return finish(fig, save)


def _is_scalar(v) -> bool:
    return isinstance(v, numbers.Real) or getattr(v, "ndim", None) == 0


def _plot_orthogonality(ax, err) -> None:
    ax.set_title(r"Orthogonality error $\|R^\top R - I\|_F$")
    if err is None:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    if _is_scalar(err):
        err = {"final": float(err)}
    elif not isinstance(err, Mapping):
        err = {"error": err}
    if not err:
        raise InvalidInputError("orthogonality error is empty")
    kinds = {_is_scalar(v) for v in err.values()}
    if len(kinds) > 1:
        raise InvalidInputError("orthogonality error must be all final values or all per-step curves, not a mix")
    if kinds == {True}:
        names = list(err)
        values = _finite_1d("orthogonality error", [err[n] for n in names])
        for i, (n, v) in enumerate(zip(names, values)):
            ax.plot([i], [v], "o", color=color(i), markersize=9)
            ax.annotate(f"{v:.1e}", (i, v), xytext=(10, 0), textcoords="offset points", ha="left", va="center",
                        fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0)
        ax.set_xlim(-0.7, len(names) - 0.3)
        ax.set_xlabel("rotation")
        ax.grid(axis="x", visible=False)
    else:
        values = []
        for i, (name, c) in enumerate(err.items()):
            c = _finite_1d(f"orthogonality error {name!r}", c)
            values.extend(c)
            ax.plot(np.arange(c.size), c, color=color(i), linewidth=1.6, label=name)
        ax.set_xlabel("step")
    if min(values) > 0:
        ax.set_yscale("log")
        for i, (name, tol) in enumerate(TOLERANCES.items()):
            ax.axhline(tol, color="gray", linestyle=("--", ":")[i % 2], linewidth=1.2, label=f"{name} {tol:.0e}")
        ax.legend(loc="best")
    elif len(err) > 1 and kinds == {False}:
        ax.legend(loc="best")
    ax.set_ylabel("Frobenius norm (unitless)")
