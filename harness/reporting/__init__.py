"""Stage 4, reporting: reports of runs and sweeps, and the regression gate's verdict."""
