"""The pipeline layer: the run folder and one module per CLI stage.

The only place that knows files and stages. Each stage module holds its typed config (embedding
`workspace.RunConfig`) and a `run(cfg)` function that reads its inputs from the run folder, calls
the core (models, extract, teacher, adapters, nla, train, evaluate), and records what it wrote.
Nothing outside `pipeline/` and `cli.py` imports this package.
"""
