import sys

from pop3sf.cli import main

sys.exit(main())
