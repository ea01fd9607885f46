"""python -m cloudml: the CLI."""
import sys

from cloudml.cli.main import main

sys.exit(main())
