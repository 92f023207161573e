"""``ray job submit -- python -m ray_jobs.prepare_data MANIFEST... -o OUT``: Shar preparation on a cluster.

Thin entrypoint: the same arguments as ``salm data prepare``; the work is ``salm.data.prepare``.
"""

from __future__ import annotations

import sys

from salm.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
