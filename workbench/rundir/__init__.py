"""Run directories without torch: claiming and locking one (``claim``), writing and reading files safely (``files``), strict JSON (``jsonsafe``)."""
