"""Floor 4, analysis: the sweep engine, the verdict (a pure judge) and numerical symmetry
discovery. It imports the floors below (core, infrastructure, models, gauges)."""
