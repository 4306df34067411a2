"""Where calibration text comes from: a text file, or a Hugging Face dataset in the local cache.

``--calib`` takes either

* a UTF-8 text file (:func:`orthoopt.quant.calib.read_text`), or
* ``hf:NAME`` / ``hf:NAME:CONFIG`` (e.g. ``hf:Salesforce/wikitext:wikitext-2-raw-v1``): the dataset's
  split ``--calib-split`` (default ``train``), column ``--calib-text-column`` (default ``text``), its
  rows joined with ``"\\n\\n"`` (as the rotation papers join WikiText), read with the ``datasets``
  package (an optional extra: ``pip install "orthoopt[datasets]"``) from the local datasets cache
  only (``$HF_DATASETS_CACHE``, default ``~/.cache/huggingface/datasets``): orthoopt never downloads
  a dataset. A dataset that is not cached, a missing ``datasets`` package, an unknown config, split or
  column fail at once (:meth:`CalibSource.check`, before any work) naming what to pass instead.
"""

from __future__ import annotations

from orthoopt.errors import InvalidInputError

import contextlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HF_PREFIX = "hf:"
DEFAULT_SPLIT = "train"
DEFAULT_COLUMN = "text"
DATASETS_HINT = 'pip install "orthoopt[datasets]" (or datasets)'


@dataclass(frozen=True)
class CalibSource:
    """A calibration text source.

    Parameters
    ----------
    spec : str
        A text file path, or ``hf:NAME[:CONFIG]``.
    split : str
        The dataset split (datasets only).
    column : str
        The dataset's text column (datasets only).
    """

    spec: str
    split: str = DEFAULT_SPLIT
    column: str = DEFAULT_COLUMN

    @classmethod
    def of(cls, value, split: str | None = None, column: str | None = None) -> "CalibSource | None":
        """``value`` as a source (None stays None; a :class:`CalibSource` is kept, split/column
        given here replace its own)."""
        if value is None:
            return None
        if isinstance(value, CalibSource):
            return cls(value.spec, split or value.split, column or value.column)
        return cls(os.fspath(value), split or DEFAULT_SPLIT, column or DEFAULT_COLUMN)

    @property
    def is_dataset(self) -> bool:
        return self.spec.startswith(HF_PREFIX)

    @property
    def file(self) -> Path | None:
        """The text file (None for a dataset): an input the output must not overwrite."""
        return None if self.is_dataset else Path(self.spec)

    def dataset(self) -> tuple[str, str | None]:
        """``(name, config or None)`` of an ``hf:`` source; ValueError for a malformed one."""
        rest = self.spec[len(HF_PREFIX):]
        name, _, config = rest.partition(":")
        if not name or name.count("/") > 1 or (":" in rest and not config):
            raise InvalidInputError(f"--calib {self.spec!r}: write a dataset as hf:NAME or hf:NAME:CONFIG "
                             "(e.g. hf:Salesforce/wikitext:wikitext-2-raw-v1)")
        return name, config or None

    def describe(self) -> dict:
        """quant.json's record of the source."""
        if not self.is_dataset:
            return {"file": self.spec}
        name, config = self.dataset()
        return {"dataset": name, "config": config, "split": self.split, "column": self.column}

    def check(self) -> None:
        """Raise (FileNotFoundError / ValueError, naming the alternative) unless the text can be read
        now: the file exists, or the dataset, its split and column are in the local cache."""
        if not self.is_dataset:
            if not Path(self.spec).is_file():
                raise FileNotFoundError(f"calibration text file not found: {self.spec} (a Hugging Face dataset "
                                        "is written hf:NAME[:CONFIG])")
            return
        self.text()

    def text(self) -> str:
        """The calibration text (a file's content; a dataset column's rows joined with ``"\\n\\n"``)."""
        from orthoopt.quant.calib import read_text

        if not self.is_dataset:
            return read_text(self.spec)
        name, config = self.dataset()
        cache = os.environ.get("HF_DATASETS_CACHE")
        return _dataset_text(name, config, self.split, self.column, cache)


@contextlib.contextmanager
def _offline():
    """``datasets`` and ``huggingface_hub`` in offline mode for the block (their switches are read at
    import, so the module constants are set too), restored afterwards."""
    import datasets.config as dconfig
    import huggingface_hub.constants as hconst

    saved = (os.environ.get("HF_DATASETS_OFFLINE"), dconfig.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    dconfig.HF_HUB_OFFLINE = hconst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = saved[0]
        dconfig.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE = saved[1], saved[2]


@lru_cache(maxsize=4)
def _dataset_text(name: str, config: str | None, split: str, column: str, cache: str | None) -> str:
    what = f"hf:{name}" + (f":{config}" if config else "")
    instead = "or pass a text file: --calib FILE.txt"
    try:
        import datasets
    except ImportError:
        raise InvalidInputError(f"--calib {what} reads a Hugging Face dataset, which needs the datasets package: "
                         f"{DATASETS_HINT}; {instead}") from None
    cache_dir = cache or datasets.config.HF_DATASETS_CACHE
    with _offline():
        try:
            data = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
        except ConnectionError:
            raise InvalidInputError(f"--calib {what}: the dataset is not in the local datasets cache ({cache_dir}) and "
                             "orthoopt never downloads one; cache it once with datasets.load_dataset"
                             f"({name!r}{', ' + repr(config) if config else ''}) where the Hub is reachable, "
                             f"set HF_DATASETS_CACHE to the cache that holds it, {instead}") from None
        except ValueError as e:  # an unknown config or split of a cached dataset
            msg = " ".join(str(e).split())
            raise InvalidInputError(f"--calib {what}: {msg} (--calib-split, hf:NAME:CONFIG); {instead}") from None
    if column not in data.column_names:
        raise InvalidInputError(f"--calib {what}: split {split!r} has no column {column!r}; its columns: "
                         f"{', '.join(data.column_names)} (--calib-text-column)")
    rows = [t for t in data[column] if isinstance(t, str)]
    text = "\n\n".join(rows)
    if not text.strip():
        raise InvalidInputError(f"--calib {what}: column {column!r} of split {split!r} holds no text")
    return text


__all__ = ["CalibSource", "DEFAULT_COLUMN", "DEFAULT_SPLIT", "HF_PREFIX"]
