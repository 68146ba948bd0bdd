"""`python -m teacher_service serve|status|stop --config X`: see teacher_service.cli."""

import sys

from .cli import main

sys.exit(main())
