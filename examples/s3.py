"""An S3 run: the cube and the results live in a bucket, any S3-compatible endpoint.

    python examples/s3.py --bucket my-bucket                       # AWS, credentials from the env
    python examples/s3.py --bucket nbdask --endpoint http://127.0.0.1:9000 --key K --secret S

Writes s3://BUCKET/PREFIX/cube.zarr and results.zarr, reads them back and prints the top hits.
Needs s3fs (pip install 'nbdask[s3]'). Credentials travel to the workers inside the task graph
and never reach result attributes, logs or error messages.
"""

from __future__ import annotations

import argparse
import os

import nbdask
from nbdask.cluster import local_cluster


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="nbdask-example")
    parser.add_argument("--endpoint", help="S3-compatible endpoint URL (default: AWS)")
    parser.add_argument("--key", default=os.environ.get("AWS_ACCESS_KEY_ID"))
    parser.add_argument("--secret", default=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    parser.add_argument("--perturbations", type=int, default=200)
    parser.add_argument("--features", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    options: dict = {}
    if args.key:
        options.update(key=args.key, secret=args.secret)
    if args.endpoint:
        options["client_kwargs"] = {"endpoint_url": args.endpoint}
    base = f"s3://{args.bucket}/{args.prefix}"

    cube = nbdask.simulate(perturbations=args.perturbations, features=args.features, seed=2,
                           chunks=min(512, max(16, args.perturbations // 2)))
    nbdask.save_cube(cube, f"{base}/cube.zarr", overwrite=True, storage_options=options)

    from distributed import Client

    with local_cluster(workers=args.workers) as cluster, Client(cluster) as client:
        cube = nbdask.open_cube(f"{base}/cube.zarr", storage_options=options)
        nbdask.save_results(nbdask.test(cube), f"{base}/results.zarr", overwrite=True,
                            storage_options=options, client=client)
        results = nbdask.open_results(f"{base}/results.zarr", storage_options=options)
        hits = results.nb.hits(q_max=0.1, client=client)
    print(f"{base}/results.zarr: {results.attrs['n_tests']:,} tested, {len(hits):,} hits at q <= 0.1")
    print(hits.sort_values("p_value").head(5).to_string(index=False))


if __name__ == "__main__":
    main()
