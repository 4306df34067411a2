"""What a row of the rotation quality benchmark is: its settings, methods, quantization columns and
:class:`MethodResult`, shared by the collecting script (``rotation_quality.py``) and the page
(``_results_page.py``), which renders from the JSON record alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orthoopt.methods import METHODS as REGISTRY
from orthoopt.quant import ActQuantConfig
from orthoopt.quant.kv import KVQuantConfig

from _models import PlantedLMSpec

# SpinQuant's end-to-end objective is trained for one quantization setting: here two rows, one trained
# for per-channel W4 RTN and one for W4 RTN with groups of 64 (its A4/KV4 training is in
# benchmarks/full_settings.py).
SPINQUANT_ROWS = {"spinquant": None, "spinquant-g64": 64}
"""Benchmark row -> the weight group size its simulated W4 RTN uses (None: per output channel)."""
METHODS = (*(m for m in REGISTRY if m != "spinquant"), *SPINQUANT_ROWS)

ORIGINAL = "original"
"""The pseudo-method of the unrotated checkpoint as loaded: no norm fusion, no rotation (the real baseline)."""
METHOD_LABELS = {
    ORIGINAL: "unrotated original (norms not fused)",
    "identity": "norm-fused, no rotation", "random": "random orthogonal", "hadamard": "random Hadamard",
    "optrot": "OptRot", "optrot+": "OptRot+", "kurtosis": "KurTail (kurtosis)", "dfrot": "DFRot",
    "spinquant": "SpinQuant (trained for W4 RTN)", "spinquant-g64": "SpinQuant (trained for W4 RTN g64)",
}
QUANT_CONFIGS: dict[str, dict] = {
    "W4 RTN": {"method": "rtn", "wbits": 4},
    "W4 RTN g128": {"method": "rtn", "wbits": 4, "group_size": 128},
    "W4 RTN g64": {"method": "rtn", "wbits": 4, "group_size": 64},
    "W4 GPTQ": {"method": "gptq", "wbits": 4},
    "W4 GPTQ g128": {"method": "gptq", "wbits": 4, "group_size": 128},
    "W4 GPTQ g64": {"method": "gptq", "wbits": 4, "group_size": 64},
    "W4A8 RTN": {"method": "rtn", "wbits": 4, "act": ActQuantConfig(bits=8)},
}
"""The quantization columns. g128 is the W4A16 scheme llm-compressor and vLLM use by default
(symmetric 4-bit weights in groups of 128 input columns, activations in 16 bits); g64 is the nearest
group size that divides SmolLM2-135M's widths (576, 1536), where g128 cannot run."""
A4_COLUMNS: dict[str, dict] = {
    "W4A4KV4 RTN": {"method": "rtn", "wbits": 4, "act": ActQuantConfig(bits=4, symmetric=False, online_hadamard=True),
                    "kv": KVQuantConfig(bits=4, r3=True)},
    "W4A4KV4 GPTQ": {"method": "gptq", "wbits": 4, "act": ActQuantConfig(bits=4, symmetric=False, online_hadamard=True),
                     "kv": KVQuantConfig(bits=4, r3=True)},
}
"""Columns run only when ``--columns`` names them: the papers' W4A4KV4 (4-bit asymmetric per-token
activations, 4-bit asymmetric K/V per head, online Hadamards R4 before down_proj and R3 on queries and
keys in every row), as ``benchmarks/full_settings.py`` quantizes its rotated rows."""
ALL_COLUMNS = {**QUANT_CONFIGS, **A4_COLUMNS}
FIXED_ROTATIONS = (ORIGINAL, "identity")
"""Methods whose rotated model does not depend on the draw: their data-free (RTN) cells are computed
once and are the same in every draw; their GPTQ cells still vary with the calibration windows."""
EXPENSIVE = ("kurtosis", "dfrot", "spinquant", "spinquant-g64")
"""Methods whose rotation takes over ten minutes on SmolLM2-135M: ``--expensive-draws`` draws each."""


@dataclass(frozen=True)
class Settings:
    """What one benchmark run does (the command-line flags, resolved)."""

    model_dir: Path | None          # None: the trained planted-outlier model
    planted: PlantedLMSpec
    text: Path
    methods: tuple[str, ...]
    steps: int | None               # solver steps per phase (R1, R2) of every learned method; None: each one's default
    seq_len: int                    # window length: calibration, GPTQ and evaluation
    calib_samples: int              # calibration windows (rotation data + GPTQ)
    calib_tokens: int               # activation rows for kurtosis / dfrot (rotate_model's calib_tokens)
    eval_tokens: int                # evaluated tokens (cut into eval_tokens // seq_len windows)
    logit_windows: int              # eval windows used for the relative logit error
    spin_windows: int               # SpinQuant's training windows (seq_len tokens each, from the first half)
    spin_batch: int                 # SpinQuant's windows per step
    seed: int
    draws: int                      # draws of every method but the EXPENSIVE ones: seeds seed .. seed+draws-1
    expensive_draws: int            # draws of the EXPENSIVE methods
    cache_dir: Path
    progress: bool
    columns: tuple[str, ...] | None = None  # names of ALL_COLUMNS to run; None: QUANT_CONFIGS

    def column_configs(self) -> dict[str, dict]:
        """The quantization columns of the run (name -> quantize_model settings), in order."""
        return dict(QUANT_CONFIGS) if self.columns is None else {n: ALL_COLUMNS[n] for n in self.columns}

    def seeds(self, method: str | None = None) -> tuple[int, ...]:
        """The draw seeds of ``method`` (draw ``d`` uses seed ``seed + d`` for its GPTQ and rotation
        calibration windows and its random rotation); all methods' together when None."""
        k = self.expensive_draws if method in EXPENSIVE else self.draws
        k = max(self.draws, self.expensive_draws) if method is None else k
        return tuple(range(self.seed, self.seed + k))


@dataclass
class MethodResult:
    """One row: a rotation method over its draws, each quantized every way (lists are per draw)."""

    method: str
    seeds: tuple[int, ...]          # the draws' seeds
    rotation_seconds: list[float] = field(default_factory=list)
    invariance_error: float = 0.0   # largest relative logit error of a rotated float model (should be ~1e-6)
    loss: dict = field(default_factory=dict)  # {phase: (first, final)} of learned methods, first draw
    ppl: dict[str, list[float]] = field(default_factory=dict)
    window_nll: dict[str, list[list[float]]] = field(default_factory=dict)  # [draw][window] mean NLL
    logit_error: dict[str, list[float]] = field(default_factory=dict)
    quant_seconds: dict[str, float] = field(default_factory=dict)  # summed over draws
    eval_seconds: dict[str, float] = field(default_factory=dict)

    def mean_ppl(self, config: str) -> float | None:
        """The mean over draws of the perplexity of one quantization column (None: not run)."""
        return _mean(self.ppl[config]) if config in self.ppl else None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


FULL = {"hidden": 256, "layers": 4, "heads": 4, "train_steps": 300, "steps": None, "eval_tokens": 65536,
        "seq_len": 128, "calib_samples": 64, "calib_tokens": 2048, "logit_windows": 8, "draws": 3,
        "expensive_draws": 1,
        "spin_windows": 400, "spin_batch": 4}
REAL = {**FULL, "eval_tokens": 16384, "seq_len": 256, "calib_samples": 16, "draws": 2}
"""The defaults on a real checkpoint: the claims' methods (:data:`CLAIM_METHODS`), 2 draws, 2 worker
processes. On SmolLM2-135M, from the per-draw costs measured in the 3-draw run of ``docs/results.md``
(one draw: unrotated 310 s, Hadamard 540 s, OptRot 990 s, OptRot+ about 1,050 s of one core), about
50 minutes on 2 cores: an estimate, not a timed run of these defaults."""
CLAIM_METHODS = (ORIGINAL, "hadamard", "optrot", "optrot+")
"""The methods the claims compare (``_claims.CLAIMS``): the default on a real checkpoint; ``--methods all``
adds identity, random and the expensive ones."""
QUICK = {"hidden": 128, "layers": 2, "heads": 2, "train_steps": 20, "steps": 3, "eval_tokens": 2048,
         "seq_len": 64, "calib_samples": 8, "calib_tokens": 256, "logit_windows": 2, "draws": 2,
         "expensive_draws": 1,
         "spin_windows": 8, "spin_batch": 2}
