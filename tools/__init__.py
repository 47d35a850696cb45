"""User tools that read graphs and metadata: the graph visualizer."""
