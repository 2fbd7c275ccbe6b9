"""The simulation: per-client speed and links (the simulated clock) and the aggregation schedule
(sync, semi-sync, async) that reads arrival times off it."""
