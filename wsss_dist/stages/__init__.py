"""One module per pipeline stage, each with ``run(cfg) -> metrics``: shards, teacher, cls, cam, aff, pseudo, seg, eval, report."""
