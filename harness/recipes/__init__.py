"""The workflows (run, sweep, eval) that chain the stages, one readable file each."""
