"""Export a Ray Train checkpoint to a self-contained .nemo and/or an HF-layout directory.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python ray_jobs/export.py --checkpoint /shared/runs/x/checkpoint_000010 \\
        --nemo /shared/model.nemo --hf /shared/model_hf --dtype bf16
"""

import argparse
import sys

from salm.cli import run_command
from salm.export import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    sys.exit(run_command(run, parser.parse_args()))
