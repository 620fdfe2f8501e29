"""``python -m excelseg.synthetic OUT N [--seed S] [--size P]``: write a synthetic dataset (see ``write_dataset``)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from .dataset import write_dataset


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m excelseg.synthetic", description=write_dataset.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("n", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args(argv)
    write_dataset(args.out_dir, args.n, seed=args.seed, size=args.size, progress=True)
    print(json.dumps({"out_dir": args.out_dir, "n": args.n}))
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
