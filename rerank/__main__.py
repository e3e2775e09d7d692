import sys

from rerank.cli.main import main

sys.exit(main())
