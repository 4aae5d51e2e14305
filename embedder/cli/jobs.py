"""Fine-tuning jobs on a running `embedder serve`: ``finetune`` starts one (and follows it), ``job`` shows or
cancels one. Exit 1 when the job failed or was cancelled.

Examples::

    embedder finetune --collection pets --suffix pets --epochs 5       # -> backbone mobilenet_v2.pets
    embedder finetune --collection night-shots --suffix night --adabn  # no labels: BatchNorm statistics
    embedder finetune --collection pets --suffix pets --no-wait        # prints the job id
    embedder job JOB_ID
    embedder job JOB_ID --cancel
"""
from __future__ import annotations

import argparse

from .options import add_remote_options, client_from, param, params, positive_int, printable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune the last block(s) on a labelled collection -> a new backbone")
    p.add_argument("--collection", required=True)
    p.add_argument("--suffix", required=True, help="the new backbone is <parent>.<suffix>")
    p.add_argument("--unfreeze", type=positive_int, default=0,
                   help="blocks trained, from the end, plus the layers after them (default: the server's, 1; "
                        "at most 17 for mobilenet_v2, 16 for efficientnet_lite0, 21 for efficientnet_lite2)")
    p.add_argument("--epochs", type=positive_int, default=0,
                   help="at most this many epochs (default: the server's, 10; at most 500; early stopping)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="only these labels (default: all)")
    p.add_argument("--param", type=param, action="append", default=[], metavar="NAME=VALUE",
                   help="further settings: lr, schedule (cosine or constant), weight_decay, batch_size, "
                        "val_fraction, patience, dropout, noise, mixup, seed, precision (fp32 or bf16)")
    p.add_argument("--adabn", action="store_true",
                   help="no labels: re-estimate BatchNorm statistics on the collection's images (a target domain)")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="print the job id and return")
    add_remote_options(p)
    p.set_defaults(handler=finetune)

    p = sub.add_parser("job", help="a job's state, progress and result (--cancel stops it)")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--cancel", action="store_true", help="ask the job to stop")
    add_remote_options(p)
    p.set_defaults(handler=job)


def finetune(args: argparse.Namespace) -> int:
    """Start the job; unless --no-wait, print each epoch as it ends and the new backbone when done."""
    with client_from(args) as client:
        started = client.finetune(args.collection, args.suffix, unfreeze=args.unfreeze, epochs=args.epochs,
                                  labels=args.labels, params=params(args.param),
                                  method="adabn" if args.adabn else "finetune")
        parent = started["params"]["parent"].split(":")[0]
        print(f"job {printable(started['job_id'])}: fine-tuning collection {printable(args.collection)} -> "
              f"{printable(parent)}.{printable(args.suffix)} "
              f"({started['params']['images']} images)")
        if not args.wait:
            return 0
        shown: set[int] = set()

        def progress(j: dict) -> None:
            p = j["progress"]
            if p.get("epoch") and p["epoch"] not in shown:
                shown.add(p["epoch"])
                print(f"  epoch {p['epoch']}/{p['epochs']}: loss {p['train_loss']:.4f}, hold-out accuracy "
                      f"{p['val_accuracy']:.4f} ({p['seconds']:.1f} s)", flush=True)

        finished = client.wait_job(started["job_id"], on_progress=progress)
    return _print_job(finished)


def job(args: argparse.Namespace) -> int:
    """One job's state and result; --cancel asks it to stop first."""
    with client_from(args) as client:
        state = client.cancel_job(args.job_id) if args.cancel else client.get_job(args.job_id)
    return _print_job(state)


def _print_job(record: dict) -> int:
    """State, error and result of a job; 0 unless it failed or was cancelled."""
    print(f"job {printable(record['job_id'])}: {printable(record['state'])}"
          + (f" ({printable(record['error'])})" if record["error"] else ""))
    r = record["result"]
    if r:
        how = (f"hold-out accuracy {r['val_accuracy']:.4f} at epoch {r['best_epoch']}; {r['trunk_passes']} trunk "
               "passes" if "val_accuracy" in r else f"BatchNorm statistics of {r['images']} images")
        print(f"new backbone {printable(r['name'])} ({printable(r['model_id'])}), {how}; embed with it: "
              f"{printable(r['use'])}")
    return 0 if record["state"] in ("finished", "queued", "running") else 1
