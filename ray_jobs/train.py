"""Train a SALM on the current Ray cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python ray_jobs/train.py --config-name tiny data.train_ds.shar_path=/data/shar trainer.num_workers=2
"""

import argparse
import sys

from salm.cli import run_command
from salm.train.cli import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    sys.exit(run_command(run, parser.parse_args()))
