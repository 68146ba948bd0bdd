"""The method-comparison research code: `python -m student_worker.research.experiment`, its variants,
statistics, diagnostics and outputs."""
