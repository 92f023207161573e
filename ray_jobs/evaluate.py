"""Evaluate a saved SALM on the current Ray cluster: Ray Data `map_batches` over model actors.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python ray_jobs/evaluate.py /shared/model.nemo --manifest /shared/test.json \\
        --num-actors 4 --batch-size 32 --out-dir /shared/eval

One GPU per actor when the cluster has GPUs (CPU actors otherwise); the model and audio paths
must be readable from every node.
"""

import argparse
import sys

from salm.cli import run_command
from salm.evaluate import add_eval_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_eval_arguments(parser)
    args = parser.parse_args()
    args.ray = True
    sys.exit(run_command(run, args))
