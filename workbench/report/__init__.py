"""What a fitted guide says: its moments and PSIS (``posterior``, ``sized_psis``), the
Gaussian it stands for, the reference posterior, plots, ArviZ InferenceData, and the
thresholds every verdict uses (``thresholds``)."""
