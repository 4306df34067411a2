"""Models for benchmarks: a shared real checkpoint when there is one, else a briefly trained
planted-outlier Llama, cached on disk.

The planted-outlier model of :func:`orthoopt.adapters.planted_outlier_model` has random weights, so its
perplexity on text is that of a near-uniform guess and says nothing about quantization. Here it is
trained for a few hundred AdamW steps on the calibration half of the text (byte tokenizer), which
makes it a real, if weak, language model; training starts from the planted weights, and
:func:`outlier_profile` measures before and after whether the planted residual channels are still
outliers (the benchmark prints both).

Cache: ``benchmarks/.cache/planted-lm-<key>/`` (``save_pretrained`` folder + tokenizer +
``train.json``), ``key`` a hash of :class:`PlantedLMSpec` and of the training text, so a second run
with the same settings loads it instead of training. The folder is written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from orthoopt.adapters import locate
from orthoopt.testing import byte_tokenizer, planted_outlier_model
from orthoopt.quant import load_checkpoint
from orthoopt.utils.atomic import atomic_dir

from _data import SHARED, random_windows, token_ids  # benchmarks/ is on sys.path when a benchmark runs

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
TRAIN_JSON = "train.json"


def shared_model_dir(shared: Path = SHARED) -> Path | None:
    """The first (by name) folder in ``shared/models`` that holds a ``config.json``, else None."""
    models = shared / "models"
    if not models.is_dir():
        return None
    found = sorted(p for p in models.iterdir() if (p / "config.json").is_file())
    return found[0] if found else None


@dataclass(frozen=True)
class PlantedLMSpec:
    """Everything that determines the trained planted-outlier model (and so its cache key).

    Architecture and planting: arguments of :func:`orthoopt.adapters.planted_outlier_model`
    (``intermediate_size`` None = ``2 * hidden_size``; head_dim = hidden / heads).
    Training: ``steps`` AdamW steps on ``batch_size`` random windows of ``seq_len`` tokens of the
    training text (seed ``seed``); learning rate ``lr`` after ``warmup`` linear warm-up steps, cosine
    decay to ``lr / 10``; weight decay ``weight_decay`` on the projection and ``lm_head`` matrices only
    (not on embeddings or norm scales, so it does not shrink the planted embedding columns);
    gradient-norm clipping at ``clip``.
    """

    arch: str = "llama"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int | None = None
    outlier_channels: int = 4
    outlier_scale: float = 20.0
    seed: int = 0
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.1
    clip: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 2 or not self.lr > 0:
            raise ValueError(f"bad training settings: steps={self.steps}, batch_size={self.batch_size}, "
                             f"seq_len={self.seq_len}, lr={self.lr}")
        if not 0 <= self.warmup <= max(self.steps, 0):
            raise ValueError(f"warmup must be in [0, steps={self.steps}], got {self.warmup}")

    def key(self, text_sha256: str) -> str:
        """Short hash of the settings and the training text (names the cache folder)."""
        blob = json.dumps({"spec": dataclasses.asdict(self), "text": text_sha256, "format": 1}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def describe(self) -> str:
        inter = self.intermediate_size or 2 * self.hidden_size
        return (f"planted-outlier {self.arch}: hidden {self.hidden_size}, {self.num_layers} layers, "
                f"{self.num_heads} heads, MLP {inter}, {self.outlier_channels} outlier channels x{self.outlier_scale:g}; "
                f"trained {self.steps} AdamW steps of {self.batch_size}x{self.seq_len} tokens, lr {self.lr:g}, "
                f"seed {self.seed}")

    def build(self) -> torch.nn.Module:
        """The untrained planted model (float32, eval mode)."""
        return planted_outlier_model(self.arch, hidden_size=self.hidden_size, num_layers=self.num_layers,
                                     num_heads=self.num_heads, intermediate_size=self.intermediate_size,
                                     seed=self.seed, outlier_channels=self.outlier_channels,
                                     outlier_scale=self.outlier_scale)


def _lr_at(spec: PlantedLMSpec, step: int) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    span = max(spec.steps - spec.warmup, 1)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - spec.warmup) / span)))


def train_lm(model: torch.nn.Module, spec: PlantedLMSpec, train_ids: torch.Tensor, progress: bool = True) -> dict:
    """Train ``model`` in place on windows of ``train_ids`` (``[N]``) as ``spec`` says; eval mode after.

    Returns ``{"seconds", "loss_first", "loss_last" (mean of the last 10 steps, nats/token),
    "curve" (about 30 points), "tokens_seen"}``.
    """
    m = locate(model)
    no_decay = {id(m.embed.weight)} | {id(p) for p in model.parameters() if p.ndim < 2}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": spec.weight_decay},
              {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    with tqdm(total=spec.steps, desc="train planted LM", unit="step", disable=not progress, file=sys.stderr) as bar:
        for step in range(spec.steps):
            batch = random_windows(train_ids, spec.batch_size, spec.seq_len, seed=spec.seed * 1_000_003 + step)
            for g in opt.param_groups:
                g["lr"] = _lr_at(spec, step)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.clip)
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    model.eval()
    every = max(1, len(losses) // 30)
    return {"seconds": time.perf_counter() - start, "loss_first": losses[0] if losses else None,
            "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "curve": losses[::every], "tokens_seen": spec.steps * spec.batch_size * spec.seq_len}


@torch.no_grad()
def outlier_profile(model: torch.nn.Module, ids: torch.Tensor, channels: list[int]) -> dict:
    """How strongly residual ``channels`` stand out, as ratios to the median of the other channels.

    ids: ``[B, L]`` token ids run through the model (eval mode).
    Returns ``{"embedding": mean norm of the channels' embedding columns / median column norm of the
    others, "o_rows" / "down_rows": the same for the rows of o_proj / down_proj (mean over layers),
    "residual": per layer, min over the channels of their RMS at the layer's output (over all tokens)
    / median RMS of the other channels, "residual_min": min of that list}``. A planted channel
    scaled by ``s`` starts with ratios near ``s``; a ratio near 1 means it is no outlier any more.
    """
    m = locate(model)
    h = m.hidden
    if not channels or min(channels) < 0 or max(channels) >= h:
        raise ValueError(f"channels must be a non-empty list of residual channels in [0, {h}), got {channels}")
    mask = torch.zeros(h, dtype=torch.bool)
    mask[channels] = True

    def ratio(values: torch.Tensor, reduce=torch.mean) -> float:
        return float(reduce(values[mask]) / values[~mask].median())

    # The output of layer i is the input of layer i+1's input norm; the last layer's, of the final norm.
    readers = [L.norms["input_norm"] for L in m.layers[1:]] + [m.final_norm]
    outputs: list[torch.Tensor] = []
    hooks = [r.register_forward_pre_hook(lambda _mod, args: outputs.append(args[0].detach().double()))
             for r in readers]
    try:
        model.eval()
        model(input_ids=ids, use_cache=False)
    finally:
        for hk in hooks:
            hk.remove()
    residual = []
    for X in outputs:
        rms = X.reshape(-1, h).pow(2).mean(0).sqrt()
        residual.append(ratio(rms, torch.min))
    layers = m.layers
    return {
        "embedding": ratio(m.embed.weight.detach().double().norm(dim=0)),
        "o_rows": sum(ratio(L.projs["o"].weight.detach().double().norm(dim=1)) for L in layers) / len(layers),
        "down_rows": sum(ratio(L.projs["down"].weight.detach().double().norm(dim=1)) for L in layers) / len(layers),
        "residual": residual,
        "residual_min": min(residual),
    }


@dataclass
class PreparedModel:
    """The model a benchmark runs on.

    ``source``: ``"shared"`` (a real checkpoint) or ``"planted"``; ``description``: one line for the
    report; ``info``: JSON-able details (for the planted model: spec, training report, outlier
    profiles before and after training, cache folder, whether it came from the cache).
    """

    model: torch.nn.Module
    tokenizer: object
    source: str
    description: str
    info: dict


def load_shared(model_dir: Path) -> PreparedModel:
    """A real checkpoint folder (with its tokenizer), float32, eval mode."""
    model, tokenizer = load_checkpoint(model_dir)
    params = sum(p.numel() for p in model.parameters())
    desc = f"{model_dir.name} ({model.config.model_type}, {params / 1e6:.1f}M parameters) from {model_dir}"
    return PreparedModel(model, tokenizer, "shared", desc, {"model_dir": str(model_dir), "parameters": params})


def load_or_train_planted(spec: PlantedLMSpec, train_text: str, text_sha256: str, cache_dir: Path = CACHE_DIR,
                          probe_windows: int = 4, progress: bool = True) -> PreparedModel:
    """The planted-outlier model of ``spec`` trained on ``train_text`` (byte tokenizer), from
    ``cache_dir/planted-lm-<key>`` when it is there, else trained now and cached (atomically).

    ``text_sha256`` identifies the file ``train_text`` comes from (part of the key). The outlier
    profile (:func:`outlier_profile`) is measured on ``probe_windows`` random windows of the training
    text before and after training and stored with the model.
    """
    tokenizer = byte_tokenizer()
    folder = Path(cache_dir) / f"planted-lm-{spec.key(text_sha256)}"
    meta_file = folder / TRAIN_JSON
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        model, tokenizer = load_checkpoint(folder)
        info = {**meta, "cache": str(folder), "cached": True}
    else:
        ids = token_ids(train_text, tokenizer)
        model = spec.build()
        channels = list(model.config.planted_outliers["channels"])
        probe = random_windows(ids, probe_windows, spec.seq_len, seed=spec.seed + 1)
        before = outlier_profile(model, probe, channels)
        train = train_lm(model, spec, ids, progress=progress)
        after = outlier_profile(model, probe, channels)
        meta = {"spec": dataclasses.asdict(spec), "text_sha256": text_sha256, "channels": channels,
                "train": train, "outliers_before": before, "outliers_after": after,
                "parameters": sum(p.numel() for p in model.parameters())}
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / TRAIN_JSON).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        info = {**meta, "cache": str(folder), "cached": False}
    return PreparedModel(model, tokenizer, "planted", spec.describe(), info)
