"""``python -m AttentionSegLib`` is the ``attentionseg`` command."""

import sys

from .cli import main

sys.exit(main())
