"""Run mechanics every stage shares: the config model (config), the stage registry (registry), the run
directory and its up-to-date keys (rundir), checkpoints and manifests, atomic file io, console output and
errors, worker processes, timings, and the distributed runtime. Nothing here imports a stage."""
