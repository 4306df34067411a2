"""The safetensors weight store: a checkpoint that need not fit in memory, read layer by layer and
written as shards, for the one phase loop of :mod:`orthoopt.pipeline` (``rotate_streamed``).

:class:`SafetensorsStore` implements :class:`orthoopt.store.WeightStore` for every method the registry
marks as streamed (:attr:`orthoopt.methods.Method.supports_streamed`: the fixed methods, whose rotations
are drawn per unit and fused as below, the data-free learned ones with a ``streamed`` R1 objective,
e.g. OptRot, and the data methods, whose statistics :meth:`SafetensorsStore.prepare` takes before each
phase with one pass of the calibration windows through the layers (:mod:`orthoopt.streaming.statistics`):
kurtosis and dfrot keep the rows, optrot+ writes its weighted blocks ``W H^(1/2)`` to a scratch folder
inside the temporary output, :mod:`orthoopt.streaming.weighted`):

1. **R1** is one unit: each solver step reads the norm-fused R1 blocks layer by layer and accumulates
   the loss and gradient (the entry's ``streamed`` factory; OptRot:
   :class:`~orthoopt.streaming.objective.StreamedFourthPower`, over the weighted blocks for optrot+);
   kurtosis' and dfrot's objective is the in-memory one on the phase's rows.
2. **R2** is one unit per layer (``R2.0``, ``R2.1``, ..., as the phase loop plans every R2): read the layer, fuse the norms, fuse R1
   (float64, cast back as the in-memory write-back does), learn ``R2.i`` (the entry's ``objective``)
   on that layer's R1-rotated v/o blocks alone (they are the only blocks next to it), fuse it, and write the layer's shard. The
   phase loop checkpoints after each layer, so a resumed run rewrites the finished layers from their
   saved rotations and continues from the first unfinished one.

The output folder matches ``save_rotated``'s: sharded safetensors with ``model.safetensors.index.json``,
``config.json`` (``tie_word_embeddings`` cleared when fusion unties lm_head), the other files of the
input folder (tokenizer, generation config), ``orthoopt/rotations.safetensors`` and ``report.json``, written by
the one writer of both stores (:func:`orthoopt.pipeline.output.run_and_write`: a temporary sibling renamed
into place).

With the same settings the weights equal the in-memory store's bit for bit on the same machine (the
objective's segments and summation order are the same, :mod:`orthoopt.objectives.row_segments`), up
to the float64 products of the embedding and lm_head, which are formed in row slices here.

Under ``torchrun`` (an initialized process group) the R1 row stream is split across ranks and the
gradient all-reduced (:class:`orthoopt.solvers.distributed.DistributedObjective`); the layers' R2
units are split too and their results gathered; rank 0 writes the output.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from orthoopt.models.io import LEGACY_ROTATIONS_FILE, REPORT_FILE
from orthoopt.config import RotateConfig
from orthoopt.errors import InvalidInputError
from orthoopt.methods import ObjectiveInputs, StreamedInputs
from orthoopt.objectives import Objective
from orthoopt.resume import Partial, read_partial, write_partial
from orthoopt.solvers.distributed import (
    DistributedObjective,
    all_gather_objects,
    max_rank_difference,
    shard_ranges,
    world,
)
from orthoopt.store import Unit
from orthoopt.models.safetensors_folder import INDEX_FILE, SafetensorsCheckpoint
from orthoopt.streaming.fused import FusedReader
from orthoopt.adapters.calibration import rotation_rows
from orthoopt.adapters.writeback import layer_r1_entries, layer_r2_entries
from orthoopt.core import WeightBlock
from orthoopt.hadamard.signed import SignedHadamard, fast_rotation
from orthoopt.streaming.layer_rotation import apply_r1, apply_r2, r2_blocks, rotate_rows
from orthoopt.streaming.layout import DecoderLayout
from orthoopt.streaming.weighted import WeightedRows, load_blocks, save_blocks
from orthoopt.models.shards import ShardedWriter
from orthoopt.utils.memory import peak_rss_bytes

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_NOT_COPIED = {"config.json", INDEX_FILE, "pytorch_model.bin.index.json", LEGACY_ROTATIONS_FILE, REPORT_FILE}
F64 = torch.float64
SCRATCH = ".orthoopt-scratch"
"""The folder inside the temporary output that holds OptRot+'s weighted blocks during the run."""


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process so far, in MiB (:func:`orthoopt.utils.memory.peak_rss_bytes`);
    None where it cannot be read."""
    peak = peak_rss_bytes()
    return None if peak is None else peak / (1 << 20)


def rank_partial(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Rank ``rank``'s own partial checkpoint next to ``path``: ``NAME.rankR-of-W.safetensors``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix}")


def folder_checksum(ckpt: SafetensorsCheckpoint, block: int = 1 << 23) -> str:
    """SHA-256 (first 16 hex digits) of a checkpoint's ``config.json`` and weight files, read in
    ``block``-byte pieces (one pass over the files: about one R1 step's reading)."""
    h = hashlib.sha256()
    for file in [ckpt.path / "config.json", *sorted(set(ckpt.files.values()) or {ckpt.path / "model.safetensors"})]:
        h.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
    return h.hexdigest()[:16]


class SafetensorsStore:
    """A model folder as a :class:`~orthoopt.store.WeightStore` (see the module doc).

    model_dir: Hugging Face folder with safetensors weights; config: the run's
    :class:`~orthoopt.config.RotateConfig` (``checkpoint``: dtype, arch, layers_per_shard; ``compute``:
    chunk_rows, sample_fraction, device; ``include_embeddings``, ``seed``). Raises
    FileNotFoundError / ValueError for a missing or unreadable folder.
    """

    def __init__(self, model_dir, config: RotateConfig, progress: bool = True) -> None:
        config.check_streamed()
        self.config = config
        self.ckpt = SafetensorsCheckpoint(model_dir)
        self.layout = DecoderLayout.from_checkpoint(self.ckpt, config.checkpoint.arch)
        self.reader = FusedReader(self.ckpt, self.layout, config.checkpoint.torch_dtype)
        self.device = None if config.compute.device is None else torch.device(config.compute.device)
        self.progress = progress
        self.rank, self.world_size = world()
        if self.world_size > 1 and config.entry.needs_calibration:
            raise InvalidInputError(f"method {config.method!r} reads calibration text: the streamed store runs it in "
                                    "one process (not under torchrun)")
        self.rank_difference = 0.0  # max |R1 - R1 of rank 0| at the end of a distributed R1 solve
        self.R1: torch.Tensor | SignedHadamard | None = None  # as fused: fast_rotation of the solved R1
        self.r2: dict[int, torch.Tensor] = {}
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None  # the layer of the R2 unit in progress
        self._phase_data: tuple[str, dict | WeightedRows] | None = None  # (phase, {rotation: X} or weighted blocks)
        self._scratch: Path | None = None  # the weighted blocks' folder, inside the temporary output folder
        self.writer: ShardedWriter | None = None

    # WeightStore ------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        checksum = folder_checksum(self.ckpt) if self.rank == 0 else None
        return {"store": "safetensors", "model": all_gather_objects(checksum)[0],
                "model_config": self.ckpt.config.get("model_type"), "world_size": self.world_size}

    def begin(self) -> None:
        pass

    def rotation_dims(self) -> dict[str, int]:
        return {"R1": self.layout.hidden, **{f"R2.{i}": self.layout.head_dim for i in range(self.layout.num_layers)}}

    def prepare(self, phase: str, config: RotateConfig, calib, progress: bool) -> None:
        """Data methods: the rows each rotation of ``phase`` multiplies (statistics ``"activations"``,
        :meth:`_activations`) or the Hessian-weighted blocks written to the scratch folder
        (``"hessians"``, :meth:`_weighted`), taken layer by layer on the current weights; data-free:
        nothing."""
        self._phase_data = None  # the previous phase's statistics go before the next ones are taken
        if config.entry.needs_calibration and calib is None:
            raise InvalidInputError(f"method {config.method!r} needs calibration text (--calib TEXT_FILE)")
        if config.entry.statistics == "activations":
            self._phase_data = (phase, self._activations(phase, calib, progress))
        elif config.entry.statistics == "hessians":
            self._phase_data = (phase, self._weighted(phase, calib, progress))

    def _meta_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors as shapes only (``meta``): enough to name its blocks and their inputs."""
        return {k: torch.empty(self.ckpt.shape(k), device="meta") for k in self.reader.layer_keys(i)}

    def _entries(self, phase: str, i: int, t: dict[str, torch.Tensor] | None = None, side: str | None = None) -> list:
        """``(block, input module, column slice)`` of layer ``i``'s blocks of ``phase`` that learned
        objectives count (the in-memory store's ``_blocks``: full-precision ones left out), of ``side``
        only when given; views of ``t`` (default: shapes only)."""
        L = self.layout
        t = self._meta_layer(i) if t is None else t
        key, name = L.layer_key_prefix(i), f"{L.spec.layers}.{i}"
        entries = (layer_r1_entries(L.spec, t, key, name) if phase == "R1" else
                   layer_r2_entries(L.spec, t, key, name, i, L.num_heads, L.num_kv_heads, L.head_dim))
        return [e for e in entries if (side is None or e[0].side == side) and not L.spec.is_full_precision(e[0].name)]

    def _roles(self, entries: dict) -> list[str]:
        """The projection roles whose inputs ``entries`` (by layer) read."""
        L = self.layout
        modules = {m for es in entries.values() for _, m, _ in es}
        return [r for r in L.roles() if any(L.layer_modules(i)[r] in modules for i in range(L.num_layers))]

    def _statistics(self, phase: str, calib: torch.Tensor, roles: list[str], kind: str, head: bool, progress: bool):
        """:func:`~orthoopt.streaming.statistics.layer_statistics` of ``phase``'s weights (R2: R1-rotated)."""
        from orthoopt.streaming.statistics import FusedLayers, layer_statistics

        layered = FusedLayers(self.reader, self.R1 if phase == "R2" else None, self.device)
        yield from layer_statistics(layered, calib, roles, kind, max_tokens=self.config.calib.tokens,
                                    seed=self.config.seed, head=head, progress=progress and self.rank == 0)

    def _activations(self, phase: str, calib: torch.Tensor, progress: bool) -> dict[str, torch.Tensor]:
        """``{rotation: X [rows, n]}`` of ``phase`` as the in-memory store takes them (q/k/v and
        gate/up share one input per layer; R2.i: layer i's o_proj input per head), from one pass of the
        calibration windows through the norm-fused (for R2: R1-rotated) layers, one layer loaded at a time."""
        L = self.layout
        entries = {i: self._entries(phase, i, side="in") for i in range(L.num_layers)}
        roles = self._roles(entries)
        head = self._counts_lm_head(phase)
        if head:
            vocab = self.ckpt.shape(self.reader.lm_head_source)[0]
            entries["lm_head"] = [(WeightBlock(torch.empty(vocab, L.hidden, device="meta"), "R1", "in", L.lm_head),
                                   L.lm_head, None)]
        rows: dict[str, list[torch.Tensor]] = {}
        for unit, inputs in self._statistics(phase, calib, roles, "rows", head, progress):
            rotation_rows(entries[unit], inputs, rows)
        return {k: torch.cat(xs) for k, xs in rows.items()}

    def _counts_lm_head(self, phase: str) -> bool:
        """True when ``phase``'s learned objective counts lm_head (R1 with include_embeddings, untied)."""
        return phase == "R1" and self.config.include_embeddings and self.reader.has_lm_head_block

    def _weighted(self, phase: str, calib: torch.Tensor, progress: bool) -> WeightedRows:
        """OptRot+'s blocks ``W H^(1/2)`` of ``phase`` (:func:`orthoopt.objectives.hessian.weighted_block`,
        as :class:`~orthoopt.objectives.HessianWeighted` forms them in memory), formed layer by layer
        while each layer's input Hessians are at hand and written to the scratch folder, one file per
        unit (embedding: no input, left unweighted and read from the checkpoint)."""
        from orthoopt.objectives.hessian import weighted_block

        L = self.layout
        if self._scratch is None:
            raise InvalidInputError("the streamed store writes its weighted blocks into the output folder: "
                                    "call open_output first")
        folder = self._scratch / phase
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        weighted = WeightedRows(self.reader, folder, torch.promote_types(self.reader.dtype, torch.float32))
        roles = self._roles({i: self._entries(phase, i) for i in range(L.num_layers)})
        head = self._counts_lm_head(phase)
        for unit, H in self._statistics(phase, calib, roles, "hessians", head, progress):
            if unit == "lm_head":
                W = torch.cat(list(self.reader.lm_head_rows()))
                entries = [(WeightBlock(W, "R1", "in", L.lm_head), L.lm_head, None)]
            else:
                entries = self._entries(phase, unit, self._layer(unit))
            save_blocks(weighted.path(unit), [weighted_block(b, None if m is None else H[m] if sl is None
                                                             else H[m][sl, sl]) for b, m, sl in entries])
            del entries
        return weighted

    def local_units(self, units: list[Unit]) -> list[Unit]:
        """R1 (collective: every rank) and this rank's share of the layers' R2 units."""
        if any(len(u.dims) != 1 for u in units):
            raise InvalidInputError("the safetensors store solves one rotation per unit (R1, then R2.i layer by layer)")
        layers = set(shard_ranges([1] * self.layout.num_layers, self.world_size)[self.rank])
        return [u for u in units if u.key == "R1" or int(u.key.split(".")[1]) in layers]

    def objective(self, unit: Unit, config: RotateConfig, calib, progress: bool) -> Objective:
        c = self.config
        if unit.key == "R1" and c.entry.statistics == "activations":  # the phase's rows are in memory
            return c.entry.objective(self._objective_inputs(unit))
        if unit.key == "R1":
            units = [u for u in self.reader.units()
                     if c.include_embeddings or not self.layout.spec.is_full_precision(self.reader.unit_block_name(u) or "")]
            share = shard_ranges([self.reader.unit_numel(u) for u in units], self.world_size)[self.rank]
            local = None
            if len(share):
                reader = self._phase_data[1] if c.entry.statistics == "hessians" else self.reader
                local = c.entry.streamed(StreamedInputs(reader, [units[j] for j in share],
                                                        chunk_rows=c.compute.chunk_rows,
                                                        sample_fraction=c.compute.sample_fraction, seed=c.seed,
                                                        device=self.device))
            return local if self.world_size == 1 else DistributedObjective(local, {"R1": self.layout.hidden})
        i = int(unit.key.split(".")[1])
        t = self._layer(i)
        self._cached = (i, t)
        inputs = self._objective_inputs(unit)
        if c.entry.statistics == "hessians":  # the weighted blocks of prepare: weighted already
            inputs.blocks = load_blocks(self._phase_data[1].path(i))
            inputs.hessians = [None] * len(inputs.blocks)
        else:
            inputs.blocks = r2_blocks(t, self.layout, i)
        return c.entry.objective(inputs)

    def _objective_inputs(self, unit: Unit) -> ObjectiveInputs:
        """The unit's settings and, for a data method, its rotation's rows (:meth:`prepare`)."""
        c = self.config
        inputs = ObjectiveInputs(sample_fraction=c.compute.sample_fraction, seed=c.seed, device=self.device)
        if c.entry.statistics == "activations" and self._phase_data is not None and self._phase_data[0] == unit.phase:
            inputs.activations = {k: v for k, v in self._phase_data[1].items() if k in unit.dims}
        return inputs

    def settle(self, unit: Unit, rotations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if unit.key == "R1" and self.world_size > 1:
            R1 = rotations["R1"]
            self.rank_difference = max_rank_difference({"R1": R1})
            dist.broadcast(R1, src=0)  # identical already (checked above); rank 0's is the one written
        return rotations

    def apply(self, unit: Unit, rotations: dict[str, torch.Tensor]) -> None:
        if "R1" in rotations:
            self.R1 = fast_rotation(rotations["R1"])
        for k, R in rotations.items():
            if k.startswith("R2."):
                i = int(k.split(".")[1])
                self.r2[i] = R
                if self.writer is not None:  # one process: write the layer now (layers come in order)
                    self._write_layers(range(self._next_layer, i + 1))
        if unit.phase == "R2":
            self._cached = None

    def _collective(self, unit: Unit) -> bool:
        return self.world_size > 1 and unit.key == "R1"

    def write_partial(self, path, partial: Partial, unit: Unit) -> None:
        """One process: ``path``. Distributed: during and right after R1 (a collective unit: every rank
        at the same step) rank 0 writes every rank's state to ``path`` (objective states under
        ``rank{r}.``), after each rank removed its own file; in R2 each rank writes its own
        :func:`rank_partial` file. So a rank's own file is always newer than the shared one, and
        every rank that resumes agrees on whether R1 is finished."""
        path = Path(path)
        if self.world_size == 1:
            write_partial(path, partial)
        elif self._collective(unit):
            rank_partial(path, self.rank, self.world_size).unlink(missing_ok=True)
            states = all_gather_objects(partial.objective)  # also: every rank removed its file
            if self.rank == 0:
                write_partial(path, replace(partial, objective={f"rank{r}.{k}": v for r, st in enumerate(states)
                                                                for k, v in st.items()}))
            all_gather_objects(None)  # the shared file is in place before any rank goes on
        else:
            write_partial(rank_partial(path, self.rank, self.world_size), partial)

    def read_partial(self, path) -> Partial | None:
        """This rank's own file if the shared one says R1 is finished (or there is no R1), else the
        shared one with this rank's objective state; None when there is neither."""
        path = Path(path)
        shared = read_partial(path) if path.is_file() else None
        if self.world_size == 1:
            return shared
        mine = rank_partial(path, self.rank, self.world_size)
        r1_done = "R1" not in self.config.rotations or (shared is not None and "R1" in shared.results)
        if mine.is_file() and r1_done:
            return read_partial(mine)
        if shared is not None:
            prefix = f"rank{self.rank}."
            shared.objective = {k[len(prefix):]: v for k, v in shared.objective.items() if k.startswith(prefix)}
        return shared

    def report(self) -> dict:
        c = self.config
        return {"streamed": {
            "model_dtype": c.checkpoint.dtype, "chunk_rows": c.compute.chunk_rows,
            "sample_fraction": c.compute.sample_fraction, "device": c.compute.device,
            "layers_per_shard": c.checkpoint.layers_per_shard, "world_size": self.world_size,
            "rank_max_abs_difference": self.rank_difference, "peak_rss_mib": peak_rss_mib(),
            "checkpoint_bytes": self.ckpt.nbytes(),
        }}

    # layers -----------------------------------------------------------------------------------
    def _layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors, norms fused, R1 fused when known."""
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        t = self.reader.layer(i)
        if self.R1 is not None:
            apply_r1(t, self.layout, i, self.R1)
        return t

    def gather(self, rotations: dict[str, torch.Tensor], results: dict) -> tuple[dict, dict]:
        """Every rank's R2 rotations and solves (collective; unchanged in one process)."""
        if self.world_size == 1:
            return rotations, results
        mine = ({k: v for k, v in rotations.items() if k.startswith("R2.")},
                {k: v for k, v in results.items() if k.startswith("R2.")})
        rots, res = dict(rotations), dict(results)
        for r, s in all_gather_objects(mine):
            rots.update(r)
            res.update(s)
        self.r2 = {int(k.split(".")[1]): v for k, v in rots.items() if k.startswith("R2.")}
        order = ["R1"] * ("R1" in rots) + [f"R2.{i}" for i in sorted(self.r2)]
        return {k: rots[k] for k in order}, res

    # writing ----------------------------------------------------------------------------------
    def open_output(self, folder: Path) -> None:
        """Start writing shards into ``folder`` (rank 0); one process writes each layer as soon as its
        R2 is fused (:meth:`apply`), under ``torchrun`` rank 0 writes every layer after the loop."""
        self.num_shards, self.layer_shard = _shard_plan(self.layout, self.config.checkpoint.layers_per_shard)
        self.writer = ShardedWriter(folder, self.num_shards)
        self._scratch = Path(folder) / SCRATCH
        self._next_layer = 0
        self._pending: dict[str, torch.Tensor] = {}

    def _write_layers(self, layers) -> None:
        L = self.layout
        for i in layers:
            t = self._layer(i)
            if i in self.r2:
                apply_r2(t, L, i, self.r2[i])
            self._pending.update(t)
            del t
            self._cached = None
            self._next_layer = i + 1
            if i + 1 == L.num_layers or self.layer_shard[i + 1] != self.layer_shard[i]:
                self.writer.write(self.layer_shard[i], self._pending)
                self._pending = {}

    def write_rest(self) -> None:
        """The layers not written yet, the embedding (shard 0), final norm and lm_head (last shard), index."""
        L, reader, ckpt, R1 = self.layout, self.reader, self.ckpt, self.R1
        rest = range(self._next_layer, L.num_layers)
        for i in tqdm(rest, desc="rotate and write layers", disable=not self.progress or not len(rest),
                      file=sys.stderr):
            self._write_layers([i])
        layer_keys = {k for i in range(L.num_layers) for k in reader.layer_keys(i)}
        special = {L.key(L.embed), L.key(L.final_norm), L.key(L.lm_head)}
        E = torch.empty(ckpt.shape(L.key(L.embed)), dtype=reader.dtype)
        start = 0
        for rows in reader.embed_rows():
            E[start:start + rows.shape[0]] = rows if R1 is None else rotate_rows(rows, R1)
            start += rows.shape[0]
        others = [k for k in ckpt if k not in layer_keys and k not in special]
        self.writer.write(0, {L.key(L.embed): E, **ckpt.read(others, reader.dtype)})
        del E
        last = {L.key(L.final_norm): reader.final_norm_identity}
        if reader.has_lm_head_block:
            H = torch.empty(ckpt.shape(reader.lm_head_source), dtype=reader.dtype)
            start = 0
            for rows in reader.lm_head_rows():
                H[start:start + rows.shape[0]] = rows if R1 is None else rotate_rows(rows, R1)
                start += rows.shape[0]
            last[L.key(L.lm_head)] = H
        self.writer.write(self.num_shards - 1, last)
        self.writer.finish()

    def write_weights(self, folder: Path) -> None:
        """The layers not written yet, the rest of the weights (:meth:`write_rest`), ``config.json`` and
        the input's side files (tokenizer, generation config)."""
        self._phase_data = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)  # before the folder is renamed into place
        self.write_rest()
        _write_config(self.ckpt.path, folder, self.reader.untie, self.config.checkpoint.torch_dtype)
        _copy_side_files(self.ckpt.path, folder)


def _shard_plan(layout: DecoderLayout, layers_per_shard: int) -> tuple[int, dict[int, int]]:
    """``(number of shards, {layer: shard})``: shard 0 the embedding, then the layers, last the final
    norm and lm_head."""
    groups = -(-layout.num_layers // layers_per_shard)
    return groups + 2, {i: 1 + i // layers_per_shard for i in range(layout.num_layers)}


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the input folder's top-level files other than weights, config and orthoopt outputs."""
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in _NOT_COPIED or p.name.endswith(_WEIGHT_SUFFIXES) or p.name.startswith("."):
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def _write_config(src: Path, dst: Path, untie: bool, model_dtype: torch.dtype) -> None:
    """``config.json`` as ``save_pretrained`` of the rotated model writes it: the dtype of the saved
    weights, and ``tie_word_embeddings=False`` when fusion untied lm_head."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src, trust_remote_code=False)  # never a folder's own code
    if untie:
        for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
    config.dtype = model_dtype
    config.save_pretrained(dst)



__all__ = ["SafetensorsStore", "folder_checksum", "peak_rss_mib", "rank_partial"]
