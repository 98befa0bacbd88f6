"""Sample images: ``python sample.py --model llamagen --sampler ar`` (see ``--help``)."""

import sys

if __name__ == "__main__":
    try:
        from genaccel.cli import sample_script_main
    except KeyboardInterrupt:  # Ctrl-C while torch is still importing: nothing has been sampled or written
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(sample_script_main())
