import sys

from llm_scratch.cli import main

sys.exit(main())
