import sys

from recursify.cli import main

sys.exit(main())
