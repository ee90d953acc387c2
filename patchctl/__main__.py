import sys

from patchctl.cli.main import main

sys.exit(main())
