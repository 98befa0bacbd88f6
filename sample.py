"""Sample images: ``python sample.py --model llamagen --sampler ar`` (see ``--help``)."""

import sys

from genaccel.cli import sample_script_main

if __name__ == "__main__":
    sys.exit(sample_script_main())
