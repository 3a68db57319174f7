"""Run directories, without torch: the names of their files (``layout``), claiming and locking
one (``claim``), writing and reading files safely (``files``), strict JSON (``jsonsafe``)."""
