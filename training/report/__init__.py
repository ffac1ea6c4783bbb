"""What a run reports at its end: summary.json (summary), report.md and its plots (report,
report_modal), the model cost."""
