import sys

from hooked_vlm.cli import main

sys.exit(main())
