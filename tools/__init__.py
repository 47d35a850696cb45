"""User tools that read graphs and metadata: the graph visualizer behind `fxadapt inspect`.

`graph_json.snapshot(gm, stage)` / `graph_json.diff(before, after)` make JSON graph snapshots;
`render.render(stages, fmt)` draws them as html, text, dot, svg or json (see docs/visualizer.md).
"""
