"""Ray job entrypoint: any raysel verb that takes a config, run as the job's driver.

    ray job submit --working-dir . -- python jobs/run.py --config CONFIG [--verb VERB] [--set KEY=VALUE ...]

VERB is `run` (the default: prepare, encode, statistics, selection), `encode`, `select`,
`train-sae`, `fac` or `synthesize`. Inside the job, raysel joins the job's cluster (RAY_ADDRESS).
"""

import argparse
import sys

from raysel.cli import UNTIL, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--verb", default="run", choices=sorted(v for v in UNTIL if v != "demo"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    sys.exit(main([args.verb, args.config, *(f"--set={o}" for o in args.overrides)]))
