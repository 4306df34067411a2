"""orthoopt: learned orthogonal rotations for post-training quantization, as one manifold problem.

Data flows one way: model -> adapter -> weight blocks -> objective -> solver -> rotations ->
adapter write-back -> checkpoint. Conventions (row vectors, ``x -> x @ R``, ``W @ R`` for blocks that
read the rotated space, ``R.T @ W`` for blocks that write it) are in ``docs/conventions.md``.
"""

from orthoopt.errors import OrthooptError

__version__ = "0.1.0"
__all__ = ["OrthooptError", "__version__", "oneshot"]


def __getattr__(name: str):
    """``orthoopt.oneshot`` (:func:`orthoopt.jobs.oneshot.oneshot`), imported on first use so that
    ``import orthoopt`` stays light."""
    if name == "oneshot":
        from orthoopt.jobs.oneshot import oneshot

        return oneshot
    raise AttributeError(f"module 'orthoopt' has no attribute {name!r}")
