"""Only the optional C extension lives here; everything else is in pyproject.toml.

patchctl._kernels holds the compression hot loops (patchctl/_kernels.c). It is
optional: where no C compiler is present the build skips it and patchctl uses
its numpy path, which gives the same bytes.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "patchctl._kernels",
            sources=["patchctl/_kernels.c"],
            extra_compile_args=["-O3", "-fvisibility=hidden", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
