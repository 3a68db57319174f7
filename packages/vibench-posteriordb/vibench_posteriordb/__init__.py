"""Eight posteriors from posteriordb (github.com/stan-dev/posteriordb), ported from Stan to
Pyro as vibench models, each with a data set of the same name and its reference posterior.

``plugin`` registers them with vibench; ``models`` holds the ports; ``reference`` says where
each posterior's files are and maps Stan's parameter names (``beta[2]``) to Pyro sites.
"""

__version__ = "0.1.0"
