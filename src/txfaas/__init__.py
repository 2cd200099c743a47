"""txfaas: an OpenFaaS-compatible function gateway and async invocation system on Twisted."""

__version__ = "0.1.0"
