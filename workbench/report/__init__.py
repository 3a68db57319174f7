"""What a fitted guide says: moments and PSIS (``posterior``, ``sized_psis``), Gaussians, the reference posterior, plots and ArviZ InferenceData."""
