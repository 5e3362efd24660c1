"""Floor 5, applications of the gauge group: gauge fixing (regularisers, canonical gauges), gauge
search along orbits, balancing, teleportation, orbit geometry. It imports every floor below."""
