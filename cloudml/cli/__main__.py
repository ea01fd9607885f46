"""python -m cloudml.cli"""
import sys

from cloudml.cli.main import main

sys.exit(main())
