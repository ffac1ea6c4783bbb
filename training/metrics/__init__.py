"""What a run learns of its steps while it trains: records and history, logging intervals, the
stage clock, the metrics processor, the run log and the progress display."""
