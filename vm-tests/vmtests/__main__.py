import sys

from vmtests.cli import main

sys.exit(main())
