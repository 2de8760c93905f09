"""The one trainer and the metrics it reports."""
