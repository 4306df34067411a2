"""Where the peak of loading a whole checkpoint goes: anonymous memory (the model's tensors) against
file-backed pages (the memory-mapped safetensors), for each load dtype (issue 23).

    python benchmarks/load_memory.py FOLDER                       # --dtype bfloat16,float32
    python benchmarks/load_memory.py benchmarks/.cache/model_size/llama-3.2-1b-bf16 --dtype float32

Each dtype loads in a fresh subprocess (``orthoopt.models.load_model``, the in-memory commands' load)
while a thread samples ``/proc/self/status`` every 20 ms; it prints the process's peak RSS (``VmHWM``),
the largest ``RssAnon`` and ``RssFile`` seen, and both after the load, in GB and as multiples of the
checkpoint's bytes. File-backed pages are the page cache of the mapped files: counted in RSS, but
clean and reclaimable, so they do not need free memory the way anonymous pages do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from orthoopt.utils.memory import memory_status  # noqa: E402


def _child(folder: str, dtype: str) -> None:
    import torch

    from orthoopt.models import load_model

    seen = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            s = memory_status()
            for k in seen:
                seen[k] = max(seen[k], s.get(k, 0))
            time.sleep(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    model = load_model(folder, dtype=getattr(torch, dtype))
    done.set()
    t.join()
    after = memory_status()
    print(json.dumps({"dtype": dtype, "peak_rss": after["VmHWM"], "max_anon": seen["RssAnon"],
                      "max_file": seen["RssFile"], "anon_after": after["RssAnon"], "file_after": after["RssFile"],
                      "parameters": sum(p.numel() for p in model.parameters())}))


def measure(folder: Path, dtype: str) -> dict:
    """The child's record for one load of ``folder`` in ``dtype`` (module doc)."""
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", str(folder), dtype],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"load_memory: error: loading {folder} as {dtype} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        _child(argv[1], argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a Hugging Face folder with safetensors weights")
    ap.add_argument("--dtype", default="bfloat16,float32", help="comma-separated load dtypes")
    args = ap.parse_args(argv)
    from orthoopt.models.dtypes import folder_dtype_bytes

    size = sum(folder_dtype_bytes(args.folder).values())
    print(f"load_memory: {args.folder} ({size / 1e9:.2f} GB of tensors)")
    print("| load dtype | peak RSS GB | max anonymous GB | max file-backed GB | after: anonymous / file-backed GB |")
    print("|---|---:|---:|---:|---|")
    for dtype in args.dtype.split(","):
        r = measure(args.folder, dtype)
        x = lambda b: f"{b / 1e9:.2f} ({b / size:.2f}x)"  # noqa: E731
        print(f"| {dtype} | {x(r['peak_rss'])} | {x(r['max_anon'])} | {x(r['max_file'])} "
              f"| {r['anon_after'] / 1e9:.2f} / {r['file_after'] / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
