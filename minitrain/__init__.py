"""minitrain: small, exact, from-scratch reference implementations of the techniques that make
LLM training stable, fast and scalable. One technique per module; see README.md for the map."""

__version__ = "0.1.0"
