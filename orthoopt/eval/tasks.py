"""Zero-shot (or few-shot) task accuracy through lm-eval-harness (``orthoopt eval --tasks``).

lm-eval (``pip install "orthoopt[eval]"``) is optional and imported only here. The model is the one
orthoopt evaluates (activation-quantization hooks included), wrapped in lm-eval's ``HFLM``. Task
datasets are read from the local Hugging Face datasets cache: unless ``HF_DATASETS_OFFLINE`` /
``HF_HUB_OFFLINE`` are already set, they are set to 1 before lm-eval loads, so a task whose dataset
is not cached fails at once with a FileNotFoundError naming the task and its dataset (set
``HF_DATASETS_OFFLINE=0`` to let lm-eval download). A task may also be a path to a task YAML file
(e.g. one whose ``dataset_path: json`` reads local files); then the built-in task index is not
scanned.
"""

from __future__ import annotations

import os
from pathlib import Path

from orthoopt.errors import InvalidInputError

MISSING = ('`--tasks` needs lm-eval-harness, which is not installed: pip install "orthoopt[eval]" '
           "(or lm-eval); {error}")


def _import_lm_eval():
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise InvalidInputError(MISSING.format(error=f"{type(e).__name__}: {e}")) from e
    return lm_eval, HFLM, TaskManager


def _dataset_of(manager, task: str) -> str:
    """``dataset_path[/dataset_name]`` of a registered task, best effort (for error messages)."""
    try:
        entry = manager.task_index.get(task)
        cfg = getattr(entry, "cfg", None) or {}
        if not cfg and getattr(entry, "yaml_path", None):
            import yaml

            cfg = yaml.load(Path(entry.yaml_path).read_text(), Loader=yaml.BaseLoader) or {}
        path, name = cfg.get("dataset_path"), cfg.get("dataset_name")
        return f"{path}/{name}" if path and name else str(path or "unknown dataset")
    except Exception:  # only for the message
        return "unknown dataset"


def evaluate_tasks(model, tokenizer, tasks: list[str], *, num_fewshot: int | None = None,
                   limit: int | float | None = None, batch_size: int = 1) -> dict:
    """Run lm-eval ``tasks`` on ``model``; ``{"tasks": {task: {metric: value}}, "lm_eval": version}``.

    Raises ValueError when lm-eval is missing or a task name is unknown, FileNotFoundError naming
    every task whose dataset is not available locally (nothing is evaluated then).
    """
    if not tasks:
        raise InvalidInputError("no tasks given")
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    files = [t for t in tasks if t.endswith((".yaml", ".yml"))]
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"task file not found: {f}")
    manager = TaskManager(include_defaults=len(files) < len(tasks))
    unknown = [t for t in tasks if t not in files and t not in manager.all_tasks]
    if unknown:
        raise InvalidInputError(f"unknown lm-eval task(s): {', '.join(unknown)} (see `lm-eval ls tasks`)")

    missing = []
    for t in tasks:  # build every task first: this is where lm-eval loads (or fails to find) the datasets
        try:
            (manager.load if hasattr(manager, "load") else manager.load_task_or_group)([t])
        except Exception as e:
            what = f"task file {t}" if t in files else f"task {t} (dataset {_dataset_of(manager, t)})"
            missing.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    if missing:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        cache = os.environ.get("HF_DATASETS_CACHE") or str(Path.home() / ".cache" / "huggingface" / "datasets")
        raise FileNotFoundError(
            "lm-eval datasets not available locally: " + "; ".join(missing) + f". Datasets are read from {cache}"
            + (" with downloads off (HF_DATASETS_OFFLINE=1); cache them on a machine with network access "
               "(e.g. run lm-eval there once) and copy the cache, or set HF_DATASETS_OFFLINE=0" if offline else "")
        )

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False, bootstrap_iters=0)
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"tasks": results, "lm_eval": getattr(lm_eval, "__version__", "unknown")}
