"""A deterministic simulation of the whole exchange (after TigerBeetle's workload and auditor):
`workload` generates seeded steps, `driver` executes them against the real services on a real
database and a manual clock, `auditor` checks the invariants after every step, `runner` runs seeds
(`gpux sim --seed S --steps N --seeds K`)."""
