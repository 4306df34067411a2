"""End-to-end jobs: a model to a quantized checkpoint with its report, in one call.

* :mod:`orthoopt.jobs.settings`: :class:`~orthoopt.jobs.settings.QuantizeSettings`, the settings of
  ``orthoopt quantize`` (a scheme name and the flags that override it), validated once.
* :mod:`orthoopt.jobs.oneshot`: :func:`~orthoopt.jobs.oneshot.oneshot` (``orthoopt.oneshot``): rotate
  (any method of :data:`orthoopt.methods.METHODS`), quantize, evaluate and write one output folder
  atomically; ``orthoopt quantize`` (with or without ``--rotate``) runs it.
* :mod:`orthoopt.jobs.report`: ``report.md`` and its pictures.
* :mod:`orthoopt.jobs.recipe`: a YAML recipe (``--recipe``) read into :func:`oneshot`'s arguments.

Nothing is imported here, so ``import orthoopt`` stays light; ``orthoopt.oneshot`` is resolved lazily.
"""
