import sys

from orthoopt.cli import main

sys.exit(main())
