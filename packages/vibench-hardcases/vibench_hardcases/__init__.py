"""Hard posteriors for vibench, each with a reference posterior to judge a fit against.

Four analytic targets (Neal's funnel in 10 dimensions, centred; Haario's twisted-Gaussian
banana; a two-mode Gaussian mixture; a correlated Student-t with 3 degrees of freedom), whose
references are exact, and two real models on synthetic data (a centred hierarchical logistic
regression with funnel geometry; a latent Gaussian process with a Poisson likelihood), whose
references are long NumPyro NUTS runs. ``plugin`` registers them with vibench; ``models``
holds the Pyro models; ``reference`` says where each posterior's files are.
"""

__version__ = "0.1.0"
