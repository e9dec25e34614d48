"""Run mechanics every stage shares: the typed config (settings: every key once) and its presets and overrides (config), the stage registry (registry), the run
directory and its up-to-date keys (rundir), checkpoints and manifests, atomic file io, console output and
errors, worker processes, timings, and the distributed runtime. Nothing here imports a stage."""
