"""The only asyncio code: wires io, control and the data plane together under uvloop."""
