import sys

from engine.measure.child_guard import guard_from_env

guard_from_env()  # a measure child started by MeasureProcess: never outlive the parent

from engine.cli import main  # noqa: E402

sys.exit(main())
