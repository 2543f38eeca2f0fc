"""Shared test helpers: the fp64-oracle + 2×-PyTorch-error rule (`oracle`), input builders
(`inputs`) and ahead-of-time Triton compilation (`aot`)."""
