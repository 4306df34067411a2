"""Wall time and peak memory of every command on checkpoints with the real shapes of Llama-3.2-1B,
Llama-3.2-3B and Llama-3-8B (issue 23, item 4).

    python benchmarks/model_size.py                 # the 1B and 3B shapes
    python benchmarks/model_size.py --include-8b    # and the 8B shape (16 GB of bf16 on disk)
    python benchmarks/model_size.py --shapes 1b --commands rotate,rotate-streamed
    python benchmarks/model_size.py --quick         # a tiny shape, seconds (the smoke test runs it)

Each shape is a random-weight **bfloat16** checkpoint built from the ``transformers.LlamaConfig``
values written down in :data:`SHAPES` (the published configs' hidden size, layers, heads, kv heads,
intermediate size, vocabulary and embedding tying; the weights are random, so only time and memory
mean anything). It is written shard by shard (the embedding, then one shard per decoder layer, then
the final norm and lm_head), so building it never holds more than one shard in memory, and cached
under ``benchmarks/.cache/model_size/`` (atomically; a finished folder is reused). The free disk is
checked first: the checkpoint plus one command output (the outputs are deleted after each command),
refused with the reason when it does not fit.

Each command then runs as its own subprocess, one after the other (never two at once), under
``/usr/bin/time -v`` (peak RSS of the whole process, ``Maximum resident set size``); without
``/usr/bin/time`` a small wrapper process runs the command and reports
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of its only child. The commands:

==================  ===========================================================================
rotate              ``orthoopt rotate CKPT --method hadamard`` (in memory)
rotate-streamed     ``orthoopt rotate CKPT --method hadamard --streamed``
quantize-rtn        ``orthoopt quantize CKPT --method rtn --wbits 4 --format orthoopt``
quantize-gptq       ``orthoopt quantize CKPT --method gptq --calib TEXT --nsamples W --seq-len L --format orthoopt``
quantize-ct         ``orthoopt quantize CKPT --scheme W4A16 --format compressed-tensors`` (RTN, packed export)
eval                ``orthoopt eval CKPT --text TEXT --seq-len L --max-tokens W*L``
eval-float32        the same with ``--dtype float32``: the layers compute in float32 (on a CPU without
                    native bf16 kernels, AVX2 only, the faster choice; only when named)
diagnose            ``orthoopt diagnose CKPT --out OUT`` (weights only; whole model: only when named)
diagnose-acts       ``orthoopt diagnose CKPT --out OUT --calib TEXT --calib-tokens W*L --seq-len L`` (and activations)
rotate-kurtosis     ``orthoopt rotate CKPT --method kurtosis --steps 2 --calib TEXT --calib-tokens W*L --calib-seq-len L``
                    (a data method: the layers' inputs on calibration text; only when named)
rotate-optrot+      the same with ``--method optrot+`` (the layers' input Hessians; only when named)
rotate-optrot       ``orthoopt rotate CKPT --method optrot --steps 2`` (data-free, learned: the solver's
                    loss-and-gradient evaluations over every weight; only when named)
*-streamed          the same command with ``--streamed``: one decoder layer in memory at a time
                    (``quantize-rtn-streamed``, ``quantize-gptq-streamed``, ``quantize-ct-streamed``, ``eval-streamed``,
                    ``diagnose-streamed``, ``diagnose-acts-streamed``, ``rotate-kurtosis-streamed``,
                    ``rotate-optrot+-streamed``, ``rotate-optrot-streamed``, ``eval-float32-streamed``)
==================  ===========================================================================

The rtn and gptq commands write orthoopt's format (fake-quantized weights + quant.json) and the ct
commands compressed-tensors (packed int4 codes), each with and without ``--streamed``, so every pair
compares like for like.

A command the memory check refuses (``orthoopt`` exits 2 when its estimated peak exceeds the
available memory, ``docs/performance.md``) is reported as refused with the message; ``--force`` passes
``--force`` on. The table prints wall time, peak RSS and peak RSS / checkpoint size per command and
shape, and the share of the checkpoint in the page cache as the command started (``cached``, from
``mincore``: ``benchmarks/_pagecache.py``); ``--json PATH`` also writes the records.

Before each command ``--page-cache`` sets that share: ``warm`` (the default) reads the checkpoint's
files once, so a command's reads come from memory as far as it holds them (all three shapes fit in
this 24 GiB machine's cache, but the cache shrinks again when the machine idles: 15 GB cached after
the 8B eval, 8 GB ten idle minutes later, 45% of the 8B checkpoint); ``cold`` evicts them; ``as-is`` leaves the cache as the
last command left it. Without this a command's time depended on what ran before it (the 8B eval: 62.5 s
cached, 99.5 s evicted).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: this checkout's orthoopt
    sys.path.insert(0, str(REPO))

CACHE = Path(__file__).resolve().parent / ".cache" / "model_size"
TIME = "/usr/bin/time"
TEXT = REPO.parent / "shared" / "data" / "wikitext2-test.txt"
MARGIN = 1 << 30
"""Disk kept free beyond the checkpoint and one output (bytes)."""


@dataclass(frozen=True)
class Shape:
    """The ``LlamaConfig`` sizes of one published model (weights random)."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_tensors(self) -> dict[str, tuple[int, ...]]:
        """``{name relative to model.layers.i: shape}`` of one decoder layer."""
        h, kv, i = self.hidden_size, self.num_key_value_heads * self.head_dim, self.intermediate_size
        return {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
                "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
                "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)}

    def numel(self) -> int:
        per_layer = sum(_prod(s) for s in self.layer_tensors().values())
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_word_embeddings else 2) + self.hidden_size + self.num_hidden_layers * per_layer

    def nbytes(self) -> int:
        return 2 * self.numel()  # bfloat16


SHAPES = {
    # meta-llama/Llama-3.2-1B config.json: hidden 2048, 16 layers, 32 heads, 8 kv heads, MLP 8192, vocab 128256, tied
    "1b": Shape("llama-3.2-1b", 2048, 16, 32, 8, 8192, 128256, True),
    # meta-llama/Llama-3.2-3B: hidden 3072, 28 layers, 24 heads, 8 kv heads, MLP 8192, vocab 128256, tied
    "3b": Shape("llama-3.2-3b", 3072, 28, 24, 8, 8192, 128256, True),
    # meta-llama/Meta-Llama-3-8B: hidden 4096, 32 layers, 32 heads, 8 kv heads, MLP 14336, vocab 128256, untied
    "8b": Shape("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, False, max_position_embeddings=8192),
    # --quick: a tiny Llama with the same structure (GQA, tied)
    "tiny": Shape("tiny", 64, 2, 4, 2, 128, 512, True, max_position_embeddings=2048),
}
COMMANDS = ("rotate", "rotate-streamed", "quantize-rtn", "quantize-rtn-streamed", "quantize-gptq",
            "quantize-gptq-streamed", "quantize-ct", "quantize-ct-streamed", "eval", "eval-streamed", "diagnose",
            "diagnose-streamed", "diagnose-acts", "diagnose-acts-streamed", "rotate-kurtosis", "rotate-kurtosis-streamed",
            "rotate-optrot+", "rotate-optrot+-streamed", "rotate-optrot", "rotate-optrot-streamed", "eval-float32",
            "eval-float32-streamed")
# the whole-model diagnose has no memory check (1.25x the checkpoint at the 1B shape, weights only), and the
# data-method rotation (kurtosis, two solver steps per phase) is a probe of the streamed statistics: named, not default
DEFAULT_COMMANDS = tuple(c for c in COMMANDS if c not in ("diagnose", "diagnose-acts")
                         and not c.startswith(("rotate-kurtosis", "rotate-optrot", "eval-float32")))


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


# --------------------------------------------------------------------------------------------------
# building the checkpoints

def checkpoint_dir(shape: Shape, cache: Path = CACHE) -> Path:
    return cache / f"{shape.name}-bf16"


def check_disk(shape: Shape, cache: Path, built: bool) -> None:
    """SystemExit(2) with the reason when the free disk under ``cache`` cannot hold the checkpoint (unless
    ``built``) plus one command output plus :data:`MARGIN`."""
    cache.mkdir(parents=True, exist_ok=True)
    need = (0 if built else shape.nbytes()) + shape.nbytes() + MARGIN
    free = shutil.disk_usage(cache).free
    if free < need:
        raise SystemExit(f"model_size: error: the {shape.name} shape needs {need / 2**30:.1f} GiB of free disk under "
                         f"{cache} ({'' if built else f'{shape.nbytes() / 2**30:.1f} GiB checkpoint + '}"
                         f"{shape.nbytes() / 2**30:.1f} GiB output + 1 GiB margin), only {free / 2**30:.1f} GiB free")


def _random(shape: tuple[int, ...], gen, std: float = 0.02, rows_per_chunk: int = 8192):
    """A bfloat16 tensor of N(0, std^2) entries, drawn in row chunks (no float32 copy of the whole)."""
    import torch

    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(shape[0], -1) if len(shape) > 1 else out.view(1, -1)
    for start in range(0, flat.shape[0], rows_per_chunk):
        stop = min(flat.shape[0], start + rows_per_chunk)
        flat[start:stop] = (torch.randn(stop - start, flat.shape[1], generator=gen) * std).to(torch.bfloat16)
    return out


def build_checkpoint(shape: Shape, cache: Path = CACHE, seed: int = 0) -> Path:
    """The cached random-weight bf16 checkpoint of ``shape`` (built shard by shard on first use)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from orthoopt.testing import byte_tokenizer
    from orthoopt.utils.atomic import atomic_dir

    folder = checkpoint_dir(shape, cache)
    done = folder / "model_size.json"
    if done.is_file() and json.loads(done.read_text()).get("shape") == asdict(shape):
        return folder
    check_disk(shape, cache, built=False)
    gen = torch.Generator().manual_seed(seed)
    n = shape.num_hidden_layers
    shards = n + 2
    name = lambda i: f"model-{i + 1:05d}-of-{shards:05d}.safetensors"  # noqa: E731
    weight_map: dict[str, str] = {}
    began = time.perf_counter()
    with atomic_dir(folder) as tmp:
        config = LlamaConfig(hidden_size=shape.hidden_size, num_hidden_layers=n,
                             num_attention_heads=shape.num_attention_heads,
                             num_key_value_heads=shape.num_key_value_heads, intermediate_size=shape.intermediate_size,
                             vocab_size=shape.vocab_size, tie_word_embeddings=shape.tie_word_embeddings,
                             max_position_embeddings=shape.max_position_embeddings, rope_theta=shape.rope_theta,
                             rms_norm_eps=shape.rms_norm_eps, head_dim=shape.head_dim, bos_token_id=None,
                             eos_token_id=None, pad_token_id=None)
        config.dtype = torch.bfloat16
        config.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)

        def write(i: int, tensors: dict) -> None:
            save_file(tensors, str(tmp / name(i)), metadata={"format": "pt"})
            weight_map.update({k: name(i) for k in tensors})

        write(0, {"model.embed_tokens.weight": _random((shape.vocab_size, shape.hidden_size), gen)})
        for i in range(n):
            t = {}
            for k, s in shape.layer_tensors().items():
                # norms near 1 (not exactly: fusion has work to do), weights N(0, 0.02^2)
                t[f"model.layers.{i}.{k}"] = (1 + _random(s, gen, 0.1).float()).to(torch.bfloat16) if len(s) == 1 \
                    else _random(s, gen)
            write(1 + i, t)
            del t
        last = {"model.norm.weight": (1 + _random((shape.hidden_size,), gen, 0.1).float()).to(torch.bfloat16)}
        if not shape.tie_word_embeddings:
            last["lm_head.weight"] = _random((shape.vocab_size, shape.hidden_size), gen)
        write(shards - 1, last)
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1) + "\n")
        (tmp / "model_size.json").write_text(json.dumps({"shape": asdict(shape), "seed": seed,
                                                         "seconds": round(time.perf_counter() - began, 1)}) + "\n")
    return folder


# --------------------------------------------------------------------------------------------------
# measuring

@dataclass
class Record:
    shape: str
    command: str
    argv: list[str]
    checkpoint_bytes: int
    wall_s: float | None = None
    peak_rss_bytes: int | None = None
    returncode: int | None = None
    measured_by: str = ""
    message: str = ""
    evaluations: dict | None = None  # rotate: loss-and-gradient evaluations per phase (its report.json)
    # the fraction of the checkpoint's files in the page cache as the command started (after --page-cache
    # set it; _pagecache.resident_fraction), None where it cannot be asked or in records from before
    resident: float | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.peak_rss_bytes is None else self.peak_rss_bytes / self.checkpoint_bytes


def command_argv(command: str, ckpt: Path, out: Path, text: Path, windows: int, seq_len: int, force: bool) -> list[str]:
    """``orthoopt`` arguments of ``command`` (module doc)."""
    tail = ["--no-progress"] + (["--force"] if force else [])
    if command.endswith("-streamed") and command != "rotate-streamed":
        return command_argv(command.removesuffix("-streamed"), ckpt, out, text, windows, seq_len, force) + ["--streamed"]
    if command == "rotate":
        return ["rotate", str(ckpt), "--out", str(out), "--method", "hadamard", *tail]
    if command == "rotate-streamed":
        return ["rotate", str(ckpt), "--out", str(out), "--method", "hadamard", "--streamed", *tail]
    if command == "rotate-optrot":
        return ["rotate", str(ckpt), "--out", str(out), "--method", "optrot", "--steps", "2", *tail]
    if command in ("rotate-kurtosis", "rotate-optrot+"):
        method = command.removeprefix("rotate-")
        return ["rotate", str(ckpt), "--out", str(out), "--method", method, "--steps", "2", "--calib", str(text),
                "--calib-tokens", str(windows * seq_len), "--calib-seq-len", str(seq_len), *tail]
    if command == "quantize-rtn":
        return ["quantize", str(ckpt), "--out", str(out), "--method", "rtn", "--wbits", "4", "--format", "orthoopt", *tail]
    if command == "quantize-ct":
        return ["quantize", str(ckpt), "--out", str(out), "--scheme", "W4A16", "--format", "compressed-tensors", *tail]
    if command == "quantize-gptq":
        return ["quantize", str(ckpt), "--out", str(out), "--method", "gptq", "--wbits", "4", "--calib", str(text),
                "--nsamples", str(windows), "--seq-len", str(seq_len), "--format", "orthoopt", *tail]
    if command == "diagnose":  # no memory check to skip: no --force
        return ["diagnose", str(ckpt), "--out", str(out), "--no-progress"]
    if command == "diagnose-acts":
        return ["diagnose", str(ckpt), "--out", str(out), "--calib", str(text), "--calib-tokens", str(windows * seq_len),
                "--seq-len", str(seq_len), "--no-progress"]
    if command == "eval":
        return ["eval", str(ckpt), "--text", str(text), "--seq-len", str(seq_len), "--max-tokens",
                str(windows * seq_len), *tail]
    if command == "eval-float32":
        return command_argv("eval", ckpt, out, text, windows, seq_len, force) + ["--dtype", "float32"]
    raise ValueError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _parse_time_v(stderr: str) -> tuple[float | None, int | None]:
    """``(wall seconds, peak RSS bytes)`` from ``/usr/bin/time -v``'s report."""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", stderr)
    seconds = None
    if wall:
        h, m, s = wall.groups()
        seconds = int(h or 0) * 3600 + int(m) * 60 + float(s)
    return seconds, (int(rss.group(1)) * 1024 if rss else None)


def measure(argv: list[str], use_time: bool | None = None,
            stdout: Path | None = None) -> tuple[int, float, int | None, str, str]:
    """Run ``python -m orthoopt ARGV`` as a subprocess: ``(returncode, wall s, peak RSS bytes, how, stderr)``.

    The command's stdout is discarded, or written to the file ``stdout`` when given."""
    cmd = [sys.executable, "-m", "orthoopt", *argv]
    use_time = os.access(TIME, os.X_OK) if use_time is None else use_time
    if stdout is not None:
        with open(stdout, "w", encoding="utf-8") as sink:
            return _measure(cmd, use_time, sink)
    return _measure(cmd, use_time, subprocess.DEVNULL)


def _measure(cmd: list[str], use_time: bool, sink) -> tuple[int, float, int | None, str, str]:
    began = time.perf_counter()
    if use_time:
        p = subprocess.run([TIME, "-v", *cmd], env=_child_env(), stdout=sink, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - began
        t_wall, rss = _parse_time_v(p.stderr)
        return p.returncode, t_wall or wall, rss, "/usr/bin/time -v", p.stderr
    # a wrapper whose only child is the command: its RUSAGE_CHILDREN peak is the command's
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_measure", *cmd], env=_child_env(),
                       stdout=sink, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - began
    m = re.search(r"^model_size-rss: (\d+)$", p.stderr, re.M)
    return p.returncode, wall, (int(m.group(1)) if m else None), "getrusage(RUSAGE_CHILDREN)", p.stderr


def _measure_child(cmd: list[str]) -> int:
    import resource

    rc = subprocess.run(cmd).returncode
    print(f"model_size-rss: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}", file=sys.stderr)
    return rc


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("orthoopt ") and ": error: " in ln]
    if lines:
        return lines[-1]
    tail = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("\t")]
    return tail[-1] if tail else ""


def text_file(cache: Path, chars: int) -> Path:
    """WikiText-2 when shared, else a synthetic text of ``chars`` characters (the byte tokenizer: a token per byte)."""
    if TEXT.is_file():
        return TEXT
    path = cache / "text.txt"
    if not path.is_file() or path.stat().st_size < chars:
        cache.mkdir(parents=True, exist_ok=True)
        sentence = " rotations move outliers across channels before quantization .\n"
        path.write_text(sentence * (chars // len(sentence) + 1), encoding="utf-8")
    return path


PAGE_CACHE = ("warm", "cold", "as-is")


def prepare_cache(ckpt: Path, mode: str) -> float | None:
    """Set the page cache's share of ``ckpt`` before a command (:data:`PAGE_CACHE`): ``warm`` reads its
    files once, ``cold`` evicts them, ``as-is`` leaves the cache alone; returns the resident fraction."""
    import _pagecache

    files = _pagecache.checkpoint_files(ckpt)
    if mode == "warm":
        _pagecache.warm(files)
    elif mode == "cold":
        _pagecache.evict(files)
    elif mode != "as-is":
        raise ValueError(f"page cache mode {mode!r}; one of {', '.join(PAGE_CACHE)}")
    return _pagecache.resident_fraction(files)


def run_shape(shape: Shape, commands, cache: Path, windows: int, seq_len: int, force: bool,
              use_time: bool | None = None, progress=print, page_cache: str = "warm") -> list[Record]:
    """Build (or reuse) the checkpoint of ``shape`` and measure ``commands`` one after the other, each after
    :func:`prepare_cache` set the page cache's share of the checkpoint (``page_cache``)."""
    ckpt = build_checkpoint(shape, cache)
    check_disk(shape, cache, built=True)
    from orthoopt.models.dtypes import folder_dtype_bytes

    size = sum(folder_dtype_bytes(ckpt).values())
    text = text_file(cache, 4 * windows * seq_len + 1000)
    records = []
    for command in commands:
        work = Path(tempfile.mkdtemp(prefix=f"{shape.name}-{command}-", dir=cache))
        try:
            argv = command_argv(command, ckpt, work / "out", text, windows, seq_len, force)
            resident = prepare_cache(ckpt, page_cache)
            rc, wall, rss, how, stderr = measure(argv, use_time)
            rec = Record(shape.name, command, argv, size, round(wall, 2), rss, rc, how,
                         "" if rc == 0 else _error_line(stderr), _evaluations(work / "out"),
                         None if resident is None else round(resident, 3))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        records.append(rec)
        progress(_row(rec))
    return records


def _evaluations(out: Path) -> dict | None:
    """``{phase: loss-and-gradient evaluations}`` from a rotate output's ``report.json`` (None without one)."""
    try:
        loss = json.loads((out / "report.json").read_text()).get("loss") or {}
    except (OSError, ValueError):
        return None
    return {p: r["evaluations"] for p, r in loss.items() if isinstance(r, dict) and "evaluations" in r} or None


def _gb(b: int | None) -> str:
    return "-" if b is None else f"{b / 1e9:.2f}"


def _row(r: Record) -> str:
    if r.returncode == 0:
        status = "ok"
    elif r.returncode == 2 and "estimated peak" in r.message:
        status = "refused"
    else:
        status = f"exit {r.returncode}"
    ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
    cached = "-" if r.resident is None else f"{r.resident:.2f}"
    return (f"| {r.shape} | {_gb(r.checkpoint_bytes)} | {r.command} | {status} | {r.wall_s if r.wall_s is not None else '-'} "
            f"| {_gb(r.peak_rss_bytes)} | {ratio} | {cached} |")


HEADER = ("| shape | checkpoint GB | command | status | wall s | peak RSS GB | RSS / checkpoint | cached |\n"
          "|---|---:|---|---|---:|---:|---:|---:|")


def table(records: list[Record]) -> str:
    return "\n".join([HEADER, *(_row(r) for r in records)])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_measure"]:
        return _measure_child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=None, help="comma-separated subset of 1b,3b,8b (default 1b,3b)")
    ap.add_argument("--include-8b", action="store_true", help="also the Llama-3-8B shape (16 GB bf16 on disk)")
    ap.add_argument("--quick", action="store_true", help="a tiny shape only (smoke test)")
    ap.add_argument("--commands", default=",".join(DEFAULT_COMMANDS),
                    help=f"comma-separated subset of {','.join(COMMANDS)} (default: all but the whole-model diagnoses, rotate-kurtosis*, rotate-optrot*, eval-float32*)")
    ap.add_argument("--windows", type=int, default=None, help="calibration / eval windows (default 4; --quick 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="window length (default 256; --quick 32)")
    ap.add_argument("--cache", default=str(CACHE), help="where checkpoints are built and outputs written")
    ap.add_argument("--force", action="store_true", help="pass --force on (skip orthoopt's memory check)")
    ap.add_argument("--no-time", action="store_true", help="measure with getrusage instead of /usr/bin/time -v")
    ap.add_argument("--page-cache", choices=PAGE_CACHE, default="warm",
                    help="the checkpoint's share of the page cache before each command: warm (read once first, the "
                         "default: every command finds it cached as far as memory allows), cold (evicted: read from "
                         "disk, or from a virtual machine's host cache), as-is; the share is recorded ('cached')")
    ap.add_argument("--json", default=None, help="also write the records to this file")
    args = ap.parse_args(argv)
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    bad = sorted(set(commands) - set(COMMANDS))
    if bad or not commands:
        ap.error(f"--commands: unknown {bad}; choose from {','.join(COMMANDS)}")
    if args.quick:
        names = ["tiny"]
    else:
        names = [s.strip() for s in (args.shapes or "1b,3b").split(",") if s.strip()]
        if args.include_8b and "8b" not in names:
            names.append("8b")
        bad = sorted(set(names) - {"1b", "3b", "8b"})
        if bad:
            ap.error(f"--shapes: unknown {bad}; choose from 1b,3b,8b")
    windows = args.windows or (2 if args.quick else 4)
    seq_len = args.seq_len or (32 if args.quick else 256)
    cache = Path(args.cache)
    use_time = False if args.no_time else None
    print(f"model_size: {', '.join(SHAPES[n].name for n in names)}; commands {', '.join(commands)}; "
          f"{windows} windows of {seq_len} tokens; measured one at a time "
          f"({'/usr/bin/time -v' if use_time is None and os.access(TIME, os.X_OK) else 'getrusage'})", flush=True)
    print(HEADER, flush=True)
    records: list[Record] = []
    for n in names:
        records += run_shape(SHAPES[n], commands, cache, windows, seq_len, args.force, use_time,
                             progress=lambda line: print(line, flush=True), page_cache=args.page_cache)
    if args.json:
        Path(args.json).write_text(json.dumps([{**asdict(r), "ratio": r.ratio} for r in records], indent=1) + "\n")
    return 0 if all(r.returncode in (0, 2) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
