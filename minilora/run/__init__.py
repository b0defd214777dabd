"""What a training run needs besides training: resume (resume.py), faults (faults.py), the end-of-run report
(report.py)."""
