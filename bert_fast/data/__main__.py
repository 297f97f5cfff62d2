import sys

from bert_fast.data.cli import main

sys.exit(main())
