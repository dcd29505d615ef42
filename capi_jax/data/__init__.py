"""Data: sources (`sources.py`), mask generators (`masking.py`), the Grain pipeline (`pipeline.py`)."""
