"""Builds the one Cython extension, overlayd._dataplane, from cext/.

Everything else lives in pyproject.toml; setuptools needs this file only for ext_modules.
OVERLAYD_NO_CYTHON=1 skips the extension (the pure-Python twins then run everywhere).
"""

import os

from setuptools import setup

ext_modules = []
if os.environ.get("OVERLAYD_NO_CYTHON") != "1":
    from Cython.Build import cythonize
    from setuptools import Extension

    ext_modules = cythonize(
        [Extension("overlayd._dataplane", ["cext/_dataplane.pyx"], extra_compile_args=["-O2"],
                   # libcrypto: ChaCha20-Poly1305 and BLAKE2s of the wireguard path
                   libraries=["crypto"])],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
        include_path=["cext"],
    )

setup(ext_modules=ext_modules)
