"""The tiny embedded world: its generated data (suite.py), the model-building pieces (training.py), the two
presets (format_shift.py, style.py) and the one cached builder (build.py)."""
