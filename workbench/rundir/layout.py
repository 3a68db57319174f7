"""The names of what a run directory holds: every module that writes or reads one asks here.
A run directory is laid out as the run-directory reference page describes (docs)."""

RECIPE = "recipe.yaml"  # the recipe as the run goes, with what each resume changed
SUMMARY = "summary.json"  # the report, strict JSON (workbench/report/summary.py)
CHECKPOINT = "checkpoint.pt"  # what --resume needs (workbench/train/checkpoint.py)
LOSSES = "losses.f64"  # every good step's loss, raw little-endian float64
PARAMS = "params.pt"  # Pyro's parameter store
POSTERIOR = "posterior.nc"  # the draws as ArviZ InferenceData
PLOTS = "plots"  # the figures, as PNG files
LOCK = ".lock"  # the pid of the process writing the directory, locked while it runs
FITS = "fits"  # the automatic pipeline's fits, each a run directory of its own
# the automatic pipeline's HMC draws (its hmc stage): float64 (chains, draws, dimensions) in
# the unconstrained coordinates of the fit it started from, a NumPy file read without pickle
CHAINS = "chains.npy"
