import sys

from codexlb.cli import main

sys.exit(main())
