"""Ray job entrypoint for the whole run:

    ray job submit --working-dir . -- python jobs/run.py --config CONFIG [--set KEY=VALUE ...]
"""

import argparse
import sys

from raysel.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    sys.exit(main(["run", args.config, *(f"--set={o}" for o in args.overrides)]))
