import sys

from raybatch.cli.app import main

sys.exit(main())
