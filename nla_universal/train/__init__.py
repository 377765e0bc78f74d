"""Training stages: AR SFT, AV SFT, the dec_M refit and adding a model; all share `loop.train`."""
