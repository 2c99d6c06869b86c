import sys

from leanlm.tools.cli import main

sys.exit(main())
