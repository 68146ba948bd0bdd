"""`python -m teacher_service.cache status|verify --cache DIR_OR_URI` (see cli.py)."""

from .cli import main

raise SystemExit(main())
