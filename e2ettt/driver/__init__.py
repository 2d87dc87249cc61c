"""The Ray layer: the only part of e2ettt that imports Ray.

`orchestrate.run` starts or joins Ray (`cluster`), prepares each regime's
weights and static curves as Ray tasks (`prepare`), runs the plan's trials
as Ray Tune trials, each one Ray Train run (`trial`), under one stop board
(`stopping`), and writes rows as they arrive (`recorder`). Everything below
it (planning, TTT, models, quantizers, tables) runs and is tested without
Ray; docs/design.md draws the layers.
"""
