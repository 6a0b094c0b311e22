import sys

from cryo2d.cli.main import main

sys.exit(main())
