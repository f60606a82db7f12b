"""Headroom's widgets: panels (model, dataset, techniques, target, profiles) and views (estimate,
run, compare). Each takes the ``AppState`` in its constructor (DESIGN rule 7)."""
