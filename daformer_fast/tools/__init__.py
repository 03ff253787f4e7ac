"""Command-line tools: dataset conversion, the synthetic benchmark, the pre-resized cache."""
