"""tcptrace: which line of code opened the TCP sockets that never got closed."""

__version__ = "0.1.0"
