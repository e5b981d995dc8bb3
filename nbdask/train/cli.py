"""Arguments of ``nbdask train`` (also ``python -m nbdask.train`` where only torch is installed)."""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="weights file to write (.npz)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws and the initialisation")
    parser.add_argument("--steps", type=int, default=40_000, help="optimiser steps (default 40000)")
    parser.add_argument("--batch", type=int, default=256, help="fresh comparisons per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--d-model", type=int, default=32, help="embedding width")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--self-layers", type=int, default=2)
    parser.add_argument("--cross-layers", type=int, default=1)
    parser.add_argument("--validate-every", type=int, default=500,
                        help="steps between validation, checkpoint and progress line")
    parser.add_argument("--validation-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT.ckpt")


def _command(args: argparse.Namespace) -> str:
    """The ``nbdask train`` command line that reproduces this run (recorded with the weights)."""
    return (f"nbdask train --out {args.out} --seed {args.seed} --steps {args.steps} --batch {args.batch} "
            f"--lr {args.lr} --d-model {args.d_model} --heads {args.heads} --self-layers {args.self_layers} "
            f"--cross-layers {args.cross_layers} --validate-every {args.validate_every} "
            f"--validation-size {args.validation_size}" + (f" --threads {args.threads}" if args.threads else ""))


def run(args: argparse.Namespace) -> int:
    try:
        from .loop import train
    except ImportError as err:
        print(f"nbdask train: needs PyTorch ({err}); `make train-venv` builds .venv-train with the CPU "
              "build, or pip install 'nbdask[train]'", file=sys.stderr)
        return 2
    meta = train(args.out, seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr,
                 d_model=args.d_model, heads=args.heads, self_layers=args.self_layers,
                 cross_layers=args.cross_layers, validate_every=args.validate_every,
                 validation_size=args.validation_size, threads=args.threads, resume=args.resume,
                 command=_command(args), log=lambda line: print(line, flush=True))
    t = meta["training"]
    print(f"wrote {args.out}: {meta['parameters']:,} parameters, {t['examples']:,} examples, "
          f"best validation loss {t['best_validation_loss']:.4f}, {t['seconds']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbdask.train",
                                     description="train the pair-set transformer on the NB2 prior")
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run(parser.parse_args(argv))
