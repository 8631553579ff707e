"""growmem: sequence models whose memory grows with the context.

Layering (one direction only):
``ops`` (pure tensor functions) <- ``layers`` (nn.Modules) <- ``models`` (language models).
"""

__version__ = "0.1.0"
