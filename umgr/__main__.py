import sys

from umgr.cli import main

sys.exit(main())
