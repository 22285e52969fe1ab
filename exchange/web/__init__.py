"""The live page for traders at `/`: plain static files, the chart library vendored."""
