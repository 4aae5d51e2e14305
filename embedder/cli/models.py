"""``embedder models``: the registered backbones, whether their weights are installed, how to name recipes and
ensembles of them (with examples), and the CPU runtime.

Examples::

    embedder models
    embedder models --json | jq -r '.models[].name'
    embedder models --model-card my-cnn.toml      # your own model, checked and listed beside the built-in ones
    embedder serve --model mobilenet_v2@stages=5-7,flip   # a recipe is served (and cached) like any model
"""
from __future__ import annotations

import argparse
import json

from ..backbones import list_backbones
from ..cards import register_cards
from ..catalog import get_backbone
from ..config import Config
from ..recipes import EXAMPLES, FORMS
from ..runtimes import RUNTIMES, installed, resolve_runtime
from .options import add_model_card_option, card_setting


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered backbones and whether their weights are installed")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_model_card_option(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print one row per backbone (name, dim, input size, model id, weights) and the CPU runtime ``auto`` picks."""
    register_cards(Config.from_env(model_cards=card_setting(args)).card_paths)
    cpu_runtime = resolve_runtime("auto", "cpu")
    rows = [{"name": s.name, "model_id": s.model_id, "sha256": s.weights.sha256, "dim": s.dim,
             "input_size": s.preprocessing.crop,
             "weights": "installed" if s.weights.present() else f"missing: {s.weights.install}",
             "text": s.has_text, "description": s.description} for s in list_backbones()]
    examples = [{"name": s.name, "dim": s.dim, "input_size": s.preprocessing.crop, "description": s.description}
                for s in map(get_backbone, EXAMPLES)]
    if args.json:
        print(json.dumps({"models": rows, "recipes": {"forms": FORMS, "examples": examples},
                          "cpu_runtime": cpu_runtime, "runtimes_installed": [r for r in RUNTIMES if installed(r)]},
                         indent=2))
        return 0
    print(f"{'name':<20} {'dim':>5} {'input':>5}  {'model id':<44} weights")
    for r in rows:
        print(f"{r['name']:<20} {r['dim']:>5} {r['input_size']:>5}  {r['model_id']:<44} {r['weights']}")
    print(f"\nRecipes and ensembles of these, named {FORMS}; for example:")
    for e in examples:
        print(f"  {e['name']:<60} {e['dim']:>5} {e['input_size']:>5}")
    print(f"\nCPU runtime: {cpu_runtime} (installed: {', '.join(r for r in RUNTIMES if installed(r))})")
    return 0
