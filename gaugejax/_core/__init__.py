"""Floor 0, the numerics core: the one diffrax wrapper (`solve`, `RK4`, the sensitivity field),
the jvp calculus of vector fields, linear-ODE propagators (the gauge/ODE correspondence), shared
types and checks. It imports nothing else of gaugejax."""
