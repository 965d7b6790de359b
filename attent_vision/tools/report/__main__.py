"""``python -m attent_vision.tools.report``: see :mod:`attent_vision.tools.report`."""

import sys

from attent_vision.tools.report.cli import main

sys.exit(main())
