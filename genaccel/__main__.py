import sys

from genaccel.cli import main

sys.exit(main())
