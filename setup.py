"""Build hook for the native I/O engine (plain C: gcc and the Python headers only)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sllm.native_loader._engine",
            sources=["native_loader/_engine.c"],
            extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            libraries=["pthread"],
        )
    ]
)
