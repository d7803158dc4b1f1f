"""spark-submit's entry file for the embed-table job: `spark-submit clip_pyfunc/cli/spark_submit.py --model-uri ...`.

It takes embed-table's flags (see `clip-pyfunc embed-table --help`) and prints the same JSON report.
"""

import sys

from clip_pyfunc.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed-table", *sys.argv[1:]]))
