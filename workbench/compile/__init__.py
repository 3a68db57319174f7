"""The compiled SVI step (``compiled_step``) and the cache of packaged CPU steps
(``package_cache``)."""
