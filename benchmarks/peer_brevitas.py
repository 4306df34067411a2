"""Brevitas, a peer that learns rotations: its fused R1+R2 rotations (optimized or Hadamard), W4, exported for `orthoopt compare`.

Runs Brevitas' own LLM flow (``brevitas_examples.llm.main.quantize_llm``, Brevitas 0.13.4) on
SmolLM2-135M with orthoopt's calibration windows, then writes each quantized model as a plain
Hugging Face folder (float32 safetensors) that ``transformers`` loads without Brevitas, so that
``orthoopt compare`` scores it on the same evaluation windows as orthoopt's own models:

* ``--rotation learned`` (default): ``--rotation fused_no_fx --rotation-mode had
  --rotation-sdpa-regions --fine-tune``: R1 (residual stream) and R2 (per head, v_proj -> o_proj)
  start at a random Hadamard matrix and are trained by Brevitas' ``RotationTrainer`` (Cayley SGD on
  the Stiefel manifold, the causal-LM loss of the W4-fake-quantized model, straight-through), then
  fused into the weights; ``--rotation hadamard``: the same regions with Brevitas' fixed Hadamard,
  no training. No ``--rotation-orphan-sink``: nothing runs online, so the rotated model is a plain
  Llama (weights-only W4A16 setting).
* weights W4 symmetric per output channel, float scales from the absolute maximum (``stats``),
  embeddings and lm_head in float; activations in float. Two folders per run: ``brevitas-ROT-rtn``
  (the model as Brevitas holds it right before its GPTQ step, i.e. what its flow gives without
  ``--gptq``) and ``brevitas-ROT-gptq`` (after Brevitas' GPTQ, damp 0.01, no act-order; block by
  block, ``--gpxq-block-name model.layers``: without it Brevitas runs the whole model over the
  calibration set once per linear group, 210 passes, about an hour per 2 windows here).

Calibration: ``--calib-samples`` windows of ``--seq-len`` tokens drawn by ``benchmarks/_data.py``
(seeded) from the first half of ``--text``; the same windows are Brevitas' calibration set, its
rotation-training set and its GPTQ set (Brevitas' loader, which downloads WikiText-2 from the Hub,
is replaced by these windows). Evaluation check: the first ``--eval-tokens`` tokens of the second
half in non-overlapping windows, scored in this process on Brevitas' quantized model (inside its
``quant_inference_mode``, as its own evaluation does) by Brevitas' ``compute_perplexity`` (its
protocol: each window's last ``seq_len // 2`` tokens) and by ``orthoopt.eval.perplexity`` (every
window's ``seq_len - 1`` predicted tokens, what ``orthoopt compare`` computes); the exported folder
is reloaded with ``transformers`` and its logits compared with Brevitas' on the first window.

Brevitas needs its own virtual environment (never orthoopt's; it is not an orthoopt dependency)::

    python -m venv /work/venvs/brevitas
    /work/venvs/brevitas/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    /work/venvs/brevitas/bin/pip install brevitas==0.13.4 transformers accelerate==1.13.0 datasets onnx gguf
    # orthoopt itself is imported from this checkout (sys.path), not installed there

(``brevitas_examples.llm.main`` imports onnx and gguf at module level. accelerate 1.14 and later
break Brevitas 0.13.4's ``remove_hooks``: their ``remove_hook_from_module`` reads an attribute of
every value in a module's ``__dict__`` and Brevitas' quantizer injectors raise ``DependencyError``
instead of ``AttributeError``; 1.13.0 keeps the fixed list of attributes.)

    OMP_NUM_THREADS=1 /work/venvs/brevitas/bin/python benchmarks/peer_brevitas.py \\
        --out runs/peer-brevitas --rotation learned --rot-steps 16

Then, in orthoopt's environment::

    python -m orthoopt compare MODEL runs/peer-brevitas/brevitas-learned-gptq ... --text SECOND_HALF \\
        --seq-len 256 --max-tokens 16384 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _data import DEFAULT_TEXT, random_windows, split_halves, token_ids  # noqa: E402


def log(msg: str) -> None:
    print(f"[peer-brevitas {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_model() -> Path | None:
    for c in (os.environ.get("ORTHOOPT_SMOLLM"), Path.home() / ".cache/orthoopt/models/smollm2-135m"):
        if c and (Path(c) / "config.json").is_file():
            return Path(c)
    return None


def brevitas_argv(model_dir: Path, rotation: str, calib_samples: int, seq_len: int, seed: int) -> list[str]:
    """Brevitas ``main.py`` arguments for one run (weights W4 per channel, R1+R2 fused, GPTQ)."""
    argv = ["--model", str(model_dir), "--dtype", "float32", "--seed", str(seed),
            "--nsamples", str(calib_samples), "--nsamples-rot-calibration", str(calib_samples),
            "--seqlen", str(seq_len),
            "--weight-bit-width", "4", "--weight-quant-granularity", "per_channel",
            "--weight-quant-type", "sym", "--weight-scale-precision", "float_scale",
            "--weight-param-method", "stats",
            "--rotation", "fused_no_fx", "--replace-rmsnorm", "--rotation-mode", "had",
            "--rotation-sdpa-regions", "--gptq", "--gpxq-block-name", "model.layers"]
    if rotation == "learned":
        argv.append("--fine-tune")
    return argv


def trainer_argv(steps: int, batch: int, lr: float, work: Path) -> list[str]:
    """Hugging Face ``TrainingArguments`` for Brevitas' rotation trainer (SpinQuant's lr and cosine decay)."""
    return ["--learning_rate", str(lr), "--max_steps", str(steps), "--per_device_train_batch_size", str(batch),
            "--gradient_accumulation_steps", "1", "--lr_scheduler_type", "cosine", "--weight_decay", "0",
            "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "true",
            "--dataloader_num_workers", "0", "--output_dir", str(work)]


def _quant_weight(module) -> torch.Tensor | None:
    """The dequantized (fake-quantized) weight of a Brevitas quant layer, else None."""
    if not hasattr(module, "quant_weight") or not module.weight_quant.is_quant_enabled:
        return None
    return module.quant_weight().value


@torch.no_grad()
def export_float(bmodel, model_dir: Path, tokenizer, out: Path) -> dict:
    """Write Brevitas' model as a plain float Llama folder: fake-quantized weights dequantized, rotations fused.

    Every parameter of a fresh model of the checkpoint's config (lm_head untied: Brevitas merges the
    final norm into it) is taken from the module of the same name in ``bmodel``; strict loading
    refuses a missing or extra name. Written to ``out.tmp`` then renamed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.tie_word_embeddings = False
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    modules = dict(bmodel.named_modules())
    state, quantized = {}, 0
    for name, _ in hf.named_parameters():
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        tensor = _quant_weight(module) if attr == "weight" else None
        if tensor is None:
            tensor = getattr(module, attr)
        else:
            quantized += 1
        state[name] = tensor.detach().to(torch.float32).clone()
    hf.load_state_dict(state, strict=True, assign=False)
    hf.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return {"quantized_linears": quantized, "parameters": len(state)}


@torch.no_grad()
def check_export(bmodel, out: Path, window: torch.Tensor) -> dict:
    """Max |logit| difference, on one window, between Brevitas' model and the exported folder reloaded."""
    from brevitas.export.inference.manager import quant_inference_mode
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = window[None]
    with quant_inference_mode(bmodel):
        bmodel(input_ids=ids)  # Brevitas' inference mode needs one call before it caches its weights
        ref = bmodel(input_ids=ids).logits.float()
    got = reloaded(input_ids=ids).logits.float()
    diff = (got - ref).abs().max().item()
    return {"max_abs_logit_diff": diff, "max_abs_logit": ref.abs().max().item(),
            "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}


@torch.no_grad()
def evaluate(bmodel, eval_ids: torch.Tensor, seq_len: int, max_tokens: int, tokenizer) -> dict:
    """Brevitas' own perplexity and orthoopt's, both on Brevitas' model in its inference mode."""
    from brevitas.export.inference.manager import quant_inference_mode
    from brevitas_examples.llm.llm_quant.eval import compute_perplexity

    from orthoopt.eval import perplexity

    n = min(max_tokens, eval_ids.numel()) // seq_len
    windows = eval_ids[: n * seq_len].view(n, seq_len)
    data = [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in windows]
    with quant_inference_mode(bmodel):
        bmodel(input_ids=windows[:1])
        start = time.perf_counter()
        own = compute_perplexity(bmodel, data, context_length=seq_len // 2, tokenizer=tokenizer)
        own_s = time.perf_counter() - start
        start = time.perf_counter()
        oo = perplexity(bmodel, eval_ids, seq_len=seq_len, max_tokens=max_tokens, progress=False)
        oo_s = time.perf_counter() - start
    return {"brevitas_compute_perplexity": own, "brevitas_context_length": seq_len // 2, "brevitas_eval_s": own_s,
            "orthoopt_perplexity": oo["ppl"], "orthoopt_windows": oo["windows"], "orthoopt_eval_s": oo_s,
            "window_nll": oo["window_nll"]}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="HF model folder [SmolLM2-135M when cached]")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="first half calibrates, second evaluates")
    p.add_argument("--out", type=Path, required=True, help="folder for the exported models and record")
    p.add_argument("--rotation", choices=("learned", "hadamard"), default="learned")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows [32]")
    p.add_argument("--seq-len", type=int, default=256, help="window length [256]")
    p.add_argument("--seed", type=int, default=0, help="calibration windows seed [0]")
    p.add_argument("--rot-steps", type=int, default=16, help="rotation optimizer steps [16]")
    p.add_argument("--rot-batch", type=int, default=2, help="windows per rotation step [2]")
    p.add_argument("--lr", type=float, default=1.5, help="Cayley SGD learning rate [1.5, SpinQuant's]")
    p.add_argument("--eval-tokens", type=int, default=16384, help="tokens of the second half for the check [16384]")
    p.add_argument("--no-eval", action="store_true", help="skip the in-process perplexity check")
    p.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import brevitas
        import brevitas_examples.llm.llm_quant.gpxq as bgpxq
        import brevitas_examples.llm.main as bmain
        from brevitas_examples.common.parse_utils import parse_args as brevitas_parse
        from brevitas_examples.llm.llm_args import create_args_parser
        from datasets import Dataset
    except ImportError as exc:
        print(f"peer_brevitas: nothing measured: Brevitas' LLM example does not import here ({exc}); "
              "run with the Brevitas venv's Python (see this script's docstring)", file=sys.stderr)
        return 0
    import transformers
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = args.model or default_model()
    if model_dir is None:
        print("peer_brevitas: error: no model: pass --model (SmolLM2-135M is not cached)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    split = split_halves(args.text)
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = random_windows(token_ids(split.calib, tok), args.calib_samples, args.seq_len, seed=args.seed)
    eval_ids = token_ids(split.eval, tok)
    calib_ds = Dataset.from_list([{"input_ids": w.tolist()} for w in calib])

    def windows_instead_of_hub(**kwargs):  # calibration, validation and rotation-training sets
        return calib_ds

    bmain.get_dataset_for_model = windows_instead_of_hub
    # Brevitas' block-wise GPxQ callback sends each block's inputs to 'cuda' unconditionally
    # (brevitas_examples/llm/llm_quant/gpxq.py); on a CPU-only torch keep them on the CPU. The
    # algorithm is untouched; only the device of the cached block inputs changes.
    real_send = bgpxq.send_to_device
    bgpxq.send_to_device = lambda obj, device, *a, **kw: real_send(obj, "cpu" if device == "cuda" else device, *a, **kw)
    work = args.out / f"trainer-{args.rotation}"
    bargv = brevitas_argv(model_dir, args.rotation, args.calib_samples, args.seq_len, args.seed)
    extra = trainer_argv(args.rot_steps, args.rot_batch, args.lr, work) if args.rotation == "learned" else []
    bargs, bextra = brevitas_parse(create_args_parser(), bargv + extra)
    record = {"command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/peer_brevitas.py",
                                                                      *(sys.argv[1:] if argv is None else argv)]),
              "brevitas_argv": bargv + extra, "versions": {"brevitas": brevitas.__version__, "torch": torch.__version__,
                                                         "transformers": transformers.__version__},
              "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s)",
              "load_start": os.getloadavg(), "text": split.describe(),
              "calibration": f"{args.calib_samples} x {args.seq_len} tokens, seed {args.seed}", "models": {}}
    timings = {"start": time.perf_counter()}
    real_gptq = bmain.apply_gptq
    rtn_name = f"brevitas-{args.rotation}-rtn"

    def export_then_gptq(model, *a, **kw):
        """Brevitas calls GPTQ after its rotation training and fusion: export the RTN state first."""
        timings["before_gptq"] = time.perf_counter()
        log(f"rotation {'training + ' if args.rotation == 'learned' else ''}RTN done in "
            f"{timings['before_gptq'] - timings['start']:.0f} s; exporting {rtn_name}")
        record["models"][rtn_name] = {"export": export_float(model, model_dir, tok, args.out / rtn_name),
                                      "check": check_export(model, args.out / rtn_name, calib[0])}
        log(f"{rtn_name}: {record['models'][rtn_name]}")
        timings["gptq_start"] = time.perf_counter()
        result = real_gptq(model, *a, **kw)
        timings["gptq_s"] = time.perf_counter() - timings["gptq_start"]
        return result

    bmain.apply_gptq = export_then_gptq
    log(f"Brevitas {brevitas.__version__}: {' '.join(bargv + extra)}")
    _, bmodel = bmain.quantize_llm(bargs, bextra)
    timings["brevitas_total_s"] = time.perf_counter() - timings["start"] - (
        timings["gptq_start"] - timings["before_gptq"])
    gptq_name = f"brevitas-{args.rotation}-gptq"
    record["models"][gptq_name] = {"export": export_float(bmodel, model_dir, tok, args.out / gptq_name),
                                   "check": check_export(bmodel, args.out / gptq_name, eval_ids[: args.seq_len])}
    log(f"{gptq_name}: {record['models'][gptq_name]}")
    record["seconds"] = {"rotation_and_rtn": timings["before_gptq"] - timings["start"], "gptq": timings["gptq_s"],
                         "brevitas_flow": timings["brevitas_total_s"]}
    if not args.no_eval:
        record["models"][gptq_name]["eval"] = evaluate(bmodel, eval_ids, args.seq_len, args.eval_tokens, tok)
        log(f"{gptq_name} in-process perplexity: Brevitas {record['models'][gptq_name]['eval']['brevitas_compute_perplexity']:.4f}"
            f" (last {args.seq_len // 2} tokens of each window), orthoopt "
            f"{record['models'][gptq_name]['eval']['orthoopt_perplexity']:.4f} (whole windows)")
    record["wall_s"] = time.perf_counter() - t0
    record["load_end"] = os.getloadavg()
    path = args.out / f"brevitas-{args.rotation}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(json.dumps({k: v for k, v in record.items() if k != "models"}, indent=2))
    for name, m in record["models"].items():
        print(name, json.dumps({k: v for k, v in m.items() if k != "eval"}),
              {k: v for k, v in m.get("eval", {}).items() if k != "window_nll"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
