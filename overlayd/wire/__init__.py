"""Stateless byte formats (stdlib only): IPv4 headers and ICMP errors.

Nothing here keeps state, touches a socket or reads a clock; the data plane's pure-Python twin
builds on these functions and the tests use them as the reference for the Cython kernel.
"""
