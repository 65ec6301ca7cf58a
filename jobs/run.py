"""Ray job entrypoint: the raysel CLI, run as the job's driver, with exactly its syntax.

    ray job submit --working-dir . -- python jobs/run.py VERB CONFIG [--set KEY=VALUE ...]

VERB is any verb that takes a config: `run` (prepare, encode, statistics, selection), `encode`,
`select`, `train-sae`, `fac`, `synthesize` or `evaluate`. Inside the job, raysel joins the job's cluster
(RAY_ADDRESS). `python jobs/run.py --help` lists the verbs.
"""

import sys

from raysel.cli import main

if __name__ == "__main__":
    sys.exit(main())
